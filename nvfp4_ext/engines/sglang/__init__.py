"""SGLang adapter (work in progress): `register()` is the `sglang.srt.plugins` entry point."""


def register() -> None:
    """Register nvfp4_ext with SGLang (placeholder until the adapter lands)."""
