"""The engine versions nvfp4_ext is tested with, and the startup check that enforces them.

`pyproject.toml`'s `vllm` / `sglang` extras carry the same bounds; the check catches engines installed
some other way (a newer vLLM upgraded in place, a source build). Both `register()` entry points call
`require_supported_version` before touching the engine's classes, so an untested engine stops at startup
with one message instead of failing in the first request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nvfp4_ext.errors import Nvfp4ExtError

__all__ = [
    "SGLANG_SUPPORTED",
    "VLLM_SUPPORTED",
    "SupportedRange",
    "UnsupportedEngineVersion",
    "require_supported_version",
]


class UnsupportedEngineVersion(Nvfp4ExtError, RuntimeError):
    """The installed engine's version is outside the range nvfp4_ext is tested with."""


@dataclass(frozen=True)
class SupportedRange:
    """Versions `minimum <= v < below`, compared on their leading numeric release parts."""

    engine: str
    minimum: tuple[int, ...]
    below: tuple[int, ...]

    def __str__(self) -> str:
        return f">={_dotted(self.minimum)},<{_dotted(self.below)}"

    def contains(self, version: str) -> bool:
        release = _release(version)
        return release is not None and self.minimum <= release < self.below


VLLM_SUPPORTED = SupportedRange("vLLM", minimum=(0, 32), below=(0, 35))
SGLANG_SUPPORTED = SupportedRange("SGLang", minimum=(0, 5, 23), below=(0, 5, 24))


def _dotted(parts: tuple[int, ...]) -> str:
    return ".".join(map(str, parts))


def _release(version: str) -> tuple[int, ...] | None:
    """(0, 33, 0) from "0.33.0", "0.33.0+cu130", "0.34.1.dev3+g1234", "0.5.23.post1"; None if unparsable."""
    match = re.match(r"^v?(\d+(?:\.\d+)*)", version.strip())
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def require_supported_version(supported: SupportedRange, version: str) -> None:
    """Raise `UnsupportedEngineVersion` naming `version` and the supported range unless it is inside."""
    if not supported.contains(version):
        raise UnsupportedEngineVersion(
            f"nvfp4_ext supports {supported.engine} {supported} (tested versions); found "
            f"{supported.engine} {version!r}. Install a supported version, e.g. "
            f"`pip install \"nvfp4-ext[{supported.engine.lower()}]\"`."
        )
