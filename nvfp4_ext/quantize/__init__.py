"""`nvfp4-ext quantize` and `nvfp4-ext eval`: making NVFP4 checkpoints and measuring their accuracy."""
