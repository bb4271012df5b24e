"""nvfp4_ext: NVFP4 checkpoints and DiffusionGemma for vLLM and SGLang.

Importing the package is cheap: it pulls in neither an engine nor Triton. The format math lives in
`nvfp4_ext.format`, checkpoint I/O in `nvfp4_ext.checkpoint`, kernels in `nvfp4_ext.kernels`, denoise
policies in `nvfp4_ext.diffusion`, and one adapter per engine in `nvfp4_ext.engines`.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from nvfp4_ext.errors import CheckpointError, ConfigError, Nvfp4ExtError

try:
    __version__ = _metadata.version("nvfp4-ext")
except _metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["CheckpointError", "ConfigError", "Nvfp4ExtError", "__version__"]
