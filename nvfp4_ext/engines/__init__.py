"""Engine adapters: the only modules that import vLLM or SGLang, and only inside register()."""
