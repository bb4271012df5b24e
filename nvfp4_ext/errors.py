"""Exception types of nvfp4_ext.

Every user-facing failure (bad checkpoint, bad flag, bad request) raises a subclass of `Nvfp4ExtError`
whose message names the file, tensor or field at fault. The CLI turns them into one `error: ...` line
and exit status 2; engines surface the message at startup.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "Nvfp4ExtError"]


class Nvfp4ExtError(Exception):
    """Base class of every error nvfp4_ext raises on purpose."""


class CheckpointError(Nvfp4ExtError, ValueError):
    """A checkpoint on disk is unusable: missing, corrupt or inconsistent files, tensors or config.

    Args:
        message: what is wrong, in words a user can act on.
        file: the file at fault (config.json, a shard, the index), if known.
        tensor: the tensor at fault, if known.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None) -> None:
        self.file = file
        self.tensor = tensor
        self.reason = message
        where = []
        if file:
            where.append(f"file {file}")
        if tensor:
            where.append(f"tensor {tensor}")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


class ConfigError(Nvfp4ExtError, ValueError):
    """A bad option, flag or request field; the message names the field."""
