"""The memory-lean vLLM DiffusionGemma wiring: no fp32 [rows, vocab] logits reach our sampler."""

from __future__ import annotations

import torch

from nvfp4_ext.engines.vllm.deferred_logits import DeferredLogits


def _deferred(rows: int = 3, hidden: int = 4, vocab: int = 10) -> tuple[DeferredLogits, torch.Tensor, list]:
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(rows, hidden, generator=gen), torch.randn(vocab, hidden, generator=gen)
    calls: list[int] = []

    def project(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.tanh((x @ w.T).float() / 30) * 30

    return DeferredLogits(h, project, vocab), project(h), calls


def test_deferred_logits_report_metadata_without_computing() -> None:
    deferred, _, calls = _deferred()
    calls.clear()
    assert deferred.shape == (3, 10) and deferred.shape[0] > 0 and deferred.size(1) == 10
    assert deferred.dtype == torch.float32 and deferred.device.type == "cpu" and deferred.dim() == 2
    assert not deferred.materialized and not calls


def test_deferred_logits_become_the_logits_for_any_other_use() -> None:
    for use in (
        lambda d: torch.log_softmax(d, dim=-1),
        lambda d: d.float(),
        lambda d: d[:, :4],
        lambda d: d * 2.0,
        lambda d: d.argmax(dim=-1),
        lambda d: torch.cat([d, d]),
    ):
        deferred, logits, calls = _deferred()
        calls.clear()
        out = use(deferred)
        assert isinstance(out, torch.Tensor) and torch.equal(out, use(logits))
        assert len(calls) == 1  # computed once, then reused
        use(deferred)
        assert len(calls) == 1
