"""Checkpoint discovery, lazy tensor reading, validation and `nvfp4-ext inspect`."""
