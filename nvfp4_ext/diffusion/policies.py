"""Denoise policies: which canvas positions keep their sampled token after a denoising step.

Every policy sees per-position statistics of the *tempered* distribution (entropy and top probability,
[B, L] float32) and returns a [B, L] bool mask of accepted positions; the driver renoises every other
position with uniform random tokens, as HF does. Every policy accepts at least one position per row, so a
canvas always makes progress.

- `entropy_bound` (the reference, HF's EntropyBoundSampler, arXiv 2505.24857): accept the k lowest-entropy
  positions such that `sum(entropy_1..k) - max(entropy_1..k) <= bound`.
- `confidence` (Fast-dLLM style): accept positions whose top probability is >= threshold, and always the
  single most confident position.
- `fixed_k`: accept the k lowest-entropy positions.

Engines choose per request with `get_policy(name, **params)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from nvfp4_ext.errors import ConfigError

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "POLICY_CODES",
    "batched_accept",
    "encode_policies",
    "ConfidencePolicy",
    "DenoisePolicy",
    "EntropyBoundPolicy",
    "FixedKPolicy",
    "PolicyName",
    "get_policy",
    "policy_from_mapping",
]

PolicyName = Literal["entropy_bound", "confidence", "fixed_k"]
DEFAULT_POLICY: PolicyName = "entropy_bound"


@runtime_checkable
class DenoisePolicy(Protocol):
    """Chooses the accepted positions of a denoising step."""

    name: ClassVar[str]

    def accept(self, entropy: torch.Tensor, top_prob: torch.Tensor) -> torch.Tensor:
        """entropy, top_prob: [B, L] float32 of the tempered distribution -> [B, L] bool accepted mask
        (at least one True per row)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """`{"policy": name, **params}`, the form `policy_from_mapping` reads back."""
        ...


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{field}: must be a finite number, got {value!r}")
    return float(value)


class _PolicyBase:
    name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.name, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True)
class EntropyBoundPolicy(_PolicyBase):
    """HF's entropy-bounded acceptance; `bound` > 0 (DiffusionGemma ships 0.1)."""

    name: ClassVar[str] = "entropy_bound"
    bound: float = 0.1

    def __post_init__(self) -> None:
        if _number(self.bound, "bound") <= 0:
            raise ConfigError(f"bound: the entropy bound must be > 0, got {self.bound!r}")

    def accept(self, entropy: torch.Tensor, top_prob: torch.Tensor) -> torch.Tensor:
        # Same ops as HF's EntropyBoundSampler.accept_canvas, so masks agree bit for bit: in ascending order
        # the current entropy is the running maximum.
        sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
        keep_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= self.bound
        return torch.scatter(torch.zeros_like(keep_sorted), dim=-1, index=order, src=keep_sorted)


@dataclass(frozen=True, slots=True)
class ConfidencePolicy(_PolicyBase):
    """Accept positions whose top probability is >= `threshold` (0 < threshold <= 1), plus the most
    confident position of each row."""

    name: ClassVar[str] = "confidence"
    threshold: float = 0.9

    def __post_init__(self) -> None:
        value = _number(self.threshold, "threshold")
        if not 0 < value <= 1:
            raise ConfigError(
                f"threshold: the top-probability threshold must be in (0, 1], got {self.threshold!r}"
            )

    def accept(self, entropy: torch.Tensor, top_prob: torch.Tensor) -> torch.Tensor:
        accepted = top_prob >= self.threshold
        best = top_prob.argmax(dim=-1, keepdim=True)
        return accepted.scatter(-1, best, True)


@dataclass(frozen=True, slots=True)
class FixedKPolicy(_PolicyBase):
    """Accept the `k` lowest-entropy positions per step (all of them when k >= canvas length)."""

    name: ClassVar[str] = "fixed_k"
    k: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(
                f"k: the number of tokens accepted per step must be an integer >= 1, got {self.k!r}"
            )

    def accept(self, entropy: torch.Tensor, top_prob: torch.Tensor) -> torch.Tensor:
        k = min(self.k, entropy.shape[-1])
        # A stable sort makes ties deterministic (lowest position first).
        order = torch.sort(entropy, dim=-1, stable=True).indices[..., :k]
        return torch.zeros_like(entropy, dtype=torch.bool).scatter(-1, order, True)


POLICIES: dict[str, type[_PolicyBase]] = {
    cls.name: cls for cls in (EntropyBoundPolicy, ConfidencePolicy, FixedKPolicy)
}


# Device-side form of a policy: one small int (which rule) and one float (its parameter) per row, so a
# batch mixing policies is decided by `batched_accept` with a fixed set of ops and no host round trip.
POLICY_CODES: dict[str, int] = {"entropy_bound": 0, "confidence": 1, "fixed_k": 2}
_POLICY_PARAM = {"entropy_bound": "bound", "confidence": "threshold", "fixed_k": "k"}


def encode_policies(policies: list[DenoisePolicy]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (codes [n] int32, params [n] float32) CPU tensors for `batched_accept`; pinned when CUDA is
    available, so `.to(device, non_blocking=True)` is an asynchronous copy."""
    codes = torch.empty(len(policies), dtype=torch.int32)
    params = torch.empty(len(policies), dtype=torch.float32)
    for row, policy in enumerate(policies):
        if policy.name not in POLICY_CODES:
            raise ConfigError(f"policy: no device encoding for policy {policy.name!r}")
        codes[row] = POLICY_CODES[policy.name]
        params[row] = float(getattr(policy, _POLICY_PARAM[policy.name]))
    if torch.cuda.is_available():
        codes, params = codes.pin_memory(), params.pin_memory()
    return codes, params


def batched_accept(
    codes: torch.Tensor, params: torch.Tensor, entropy: torch.Tensor, top_prob: torch.Tensor
) -> torch.Tensor:
    """[n, L] accepted mask, row i decided by policy `codes[i]` with parameter `params[i]`
    (`encode_policies`); the same ops as each policy's `accept`, so row masks agree bit for bit.

    Every rule is evaluated for every row and the row's own is selected: [n, L] is small, and the op
    sequence does not depend on the data (no host sync; traceable by torch.compile and CUDA graphs).
    """
    codes, params = codes[:, None], params.to(entropy.dtype)[:, None]
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    keep_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= params
    entropy_bound = torch.scatter(torch.zeros_like(keep_sorted), dim=-1, index=order, src=keep_sorted)
    confidence = (top_prob >= params).scatter(-1, top_prob.argmax(dim=-1, keepdim=True), True)
    stable_order = torch.sort(entropy, dim=-1, stable=True).indices
    first_k = torch.arange(entropy.shape[-1], device=entropy.device)[None, :] < params
    fixed_k = torch.zeros_like(first_k).scatter(-1, stable_order, first_k)
    return torch.where(codes == 0, entropy_bound, torch.where(codes == 1, confidence, fixed_k))


def get_policy(name: str = DEFAULT_POLICY, **params: Any) -> DenoisePolicy:
    """Build a policy by name with validated parameters.

    Raises:
        ConfigError: unknown policy (field `policy`), unknown parameter or bad value (field named).
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"policy: unknown denoise policy {name!r}; choose one of {sorted(POLICIES)}")
    allowed = [f for f in cls.__dataclass_fields__ if f != "name"]
    for key in params:
        if key not in allowed:
            raise ConfigError(f"{key}: policy {name!r} has no parameter {key!r}; it takes {allowed}")
    return cls(**{k: v for k, v in params.items() if v is not None})  # type: ignore[return-value]


def policy_from_mapping(
    values: Mapping[str, Any],
    *,
    prefix: str = "",
    default: str = DEFAULT_POLICY,
    default_params: Mapping[str, Any] | None = None,
) -> DenoisePolicy:
    """Build a policy from flat keys: `{prefix}policy` names it, `{prefix}policy_<param>` sets a parameter.

    Used for vLLM `extra_args` (prefix `diffusion_`). `default_params` apply only to the default policy
    (e.g. the checkpoint's entropy bound). Errors name the full key, e.g. `diffusion_policy_k`.
    """
    name = values.get(f"{prefix}policy", default)
    if not isinstance(name, str):
        raise ConfigError(f"{prefix}policy: must be a policy name string, got {name!r}")
    params: dict[str, Any] = dict(default_params or {}) if name == default else {}
    marker = f"{prefix}policy_"
    params.update({key[len(marker) :]: v for key, v in values.items() if key.startswith(marker)})
    try:
        return get_policy(name, **params)
    except ConfigError as exc:
        field = str(exc).split(":", 1)[0]
        full = f"{prefix}policy" if field == "policy" else f"{marker}{field}"
        raise ConfigError(f"{full}:{str(exc).split(':', 1)[1]}") from None
