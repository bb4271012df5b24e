"""`DeferredLogits`: what our DiffusionGemma's `compute_logits` hands vLLM (<= 0.33) instead of logits.

vLLM 0.32/0.33's model runner computes `logits = model.compute_logits(sampled_hidden_states)` (fp32
[rows, vocab] after the softcap: 268 MB per 256-token canvas) and passes them straight to the sampler. Our
sampler only needs the hidden states, so the model returns this stand-in: it carries the hidden states
and the real projection, reports the logits' shape, device and dtype, and becomes the real logits
(computed once) as soon as anything else uses it as a tensor: a torch function, a tensor method or
attribute, indexing or arithmetic (prompt logprobs, a built-in sampler path). Not a vLLM import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DeferredLogits", "materialize"]


class DeferredLogits:
    """Hidden states [rows, H] standing in for the fp32 logits [rows, vocab] they project to."""

    __slots__ = ("_logits", "_project", "hidden", "vocab_size")

    def __init__(
        self, hidden: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], vocab_size: int
    ) -> None:
        self.hidden = hidden
        self.vocab_size = vocab_size
        self._project = project
        self._logits: torch.Tensor | None = None

    # Metadata vLLM's runner and sampler read without needing values.
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.hidden.shape[0], self.vocab_size))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def ndim(self) -> int:
        return 2

    def dim(self) -> int:
        return 2

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @property
    def materialized(self) -> bool:
        return self._logits is not None

    def materialize(self) -> torch.Tensor:
        """The real logits (computed on first call)."""
        if self._logits is None:
            self._logits = self._project(self.hidden)
        return self._logits

    def __getattr__(self, name: str) -> Any:  # any other tensor attribute or method
        return getattr(self.materialize(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*materialize(args), **materialize(kwargs or {}))

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.materialize()[materialize(index)]

    def __setitem__(self, index: Any, value: Any) -> None:
        self.materialize()[materialize(index)] = materialize(value)

    def __repr__(self) -> str:
        return f"DeferredLogits(rows={self.hidden.shape[0]}, vocab={self.vocab_size})"


def _forward(name: str):
    def method(self: DeferredLogits, *args: Any) -> Any:
        return getattr(self.materialize(), name)(*materialize(args))

    method.__name__ = name
    return method


_OPERATORS = (
    "__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __neg__ __lt__ __le__ "
    "__gt__ __ge__ __eq__ __ne__ __iadd__ __isub__ __imul__ __itruediv__ __array__"
)
for _name in _OPERATORS.split():
    setattr(DeferredLogits, _name, _forward(_name))
DeferredLogits.__hash__ = object.__hash__  # type: ignore[method-assign]  (defining __eq__ removed it)


def materialize(value: Any) -> Any:
    """`value` with every DeferredLogits inside (tuples, lists, dict values) replaced by its logits."""
    if isinstance(value, DeferredLogits):
        return value.materialize()
    if isinstance(value, tuple | list):
        return type(value)(materialize(v) for v in value)
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    return value
