"""vLLM adapter (work in progress): `register()` is the `vllm.general_plugins` entry point."""


def register() -> None:
    """Register nvfp4_ext with vLLM (placeholder until the adapter lands)."""
