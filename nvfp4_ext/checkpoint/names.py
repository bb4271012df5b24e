"""Module-name helpers: fused shards (q/k/v -> qkv_proj, gate/up -> gate_up_proj), expert names, patterns.

Pure python; shared by config parsing, the checkpoint reader and validation.
"""

from __future__ import annotations

import fnmatch
import re

__all__ = [
    "EXPERT_INDEX",
    "PatternMatcher",
    "FUSED_EXPERT",
    "FUSED_SHARDS",
    "fused_name",
    "fused_shards",
    "group_fused",
    "pattern_matches",
    "related_names",
]

# Fused module suffix -> the shard suffixes it is built from, in order (vLLM's packed_modules_mapping).
FUSED_SHARDS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_SHARD_TO_FUSED = {shard: fused for fused, shards in FUSED_SHARDS.items() for shard in shards}
EXPERT_INDEX = re.compile(r"^(?P<parent>.*\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")
FUSED_EXPERT = re.compile(r"^(?P<parent>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


# ------------------------------------------------------------------------------------------- fused shards
def fused_shards(module: str) -> tuple[str, ...]:
    """Shards of a fused module (`a.qkv_proj` -> `a.q_proj, a.k_proj, a.v_proj`); else `(module,)`."""
    prefix, _, leaf = module.rpartition(".")
    shards = FUSED_SHARDS.get(leaf)
    if shards is None:
        return (module,)
    return tuple(f"{prefix}.{s}" if prefix else s for s in shards)


def fused_name(module: str) -> tuple[str, int] | None:
    """The fused module of a shard and its position (`a.k_proj` -> (`a.qkv_proj`, 1)); else None."""
    prefix, _, leaf = module.rpartition(".")
    fused = _SHARD_TO_FUSED.get(leaf)
    if fused is None:
        return None
    return (f"{prefix}.{fused}" if prefix else fused, FUSED_SHARDS[fused].index(leaf))


def group_fused(modules: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """Group shard modules under their fused name (shards in fused order: q, k, v / gate, up), keeping only
    groups with more than one shard present.

    Per-expert names (`experts.{e}.gate_proj`) are not grouped across experts: each expert is its own group.
    """
    groups: dict[str, list[tuple[int, str]]] = {}
    for module in modules:
        fused = fused_name(module)
        if fused is not None:
            groups.setdefault(fused[0], []).append((fused[1], module))
    return {name: [m for _, m in sorted(shards)] for name, shards in groups.items() if len(shards) > 1}


# ------------------------------------------------------------------------------------------- patterns
def pattern_matches(pattern: str, module: str) -> bool:
    """Whether an exclude/ignore/target pattern covers a module name.

    `re:<regex>` (compressed-tensors) uses `re.match`; otherwise the pattern matches by fnmatch wildcards,
    exactly, as a dotted prefix (`model.layers.0.self_attn` covers its children) or as a dotted suffix
    (`lm_head` covers `model.lm_head`). Plain substrings do not match (`gate` must not cover `gate_proj`).
    """
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    if module == pattern or module.startswith(pattern + ".") or module.endswith("." + pattern):
        return True
    return fnmatch.fnmatchcase(module, pattern)


def related_names(module: str) -> list[str]:
    """Names that stand for the same weights: the module, its fused parent or shards, expert siblings."""
    names = [module]
    fused = fused_name(module)
    if fused is not None:
        names.append(fused[0])
    names.extend(s for s in fused_shards(module) if s != module)
    expert = EXPERT_INDEX.match(module)
    if expert:  # per-expert name -> the fused 3-D tensor it is a slice of
        proj = expert["proj"]
        fused_proj = _SHARD_TO_FUSED.get(proj, proj)
        names.append(f"{expert['parent']}.{fused_proj}")
    return names


class PatternMatcher:
    """`pattern_matches` over a whole exclude list, fast: plain names are looked up in a set (the module,
    its dotted prefixes and dotted suffixes), only wildcard and `re:` patterns are tried one by one.

    Real exclude lists hold hundreds of exact names and are asked about thousands of expert modules.
    """

    def __init__(self, patterns: tuple[str, ...] | list[str]) -> None:
        self.patterns = tuple(patterns)
        self._literal: set[str] = set()
        self._wild: list[tuple[str, re.Pattern[str]]] = []
        for pattern in self.patterns:
            if pattern.startswith("re:"):
                self._wild.append((pattern, re.compile(pattern[3:])))
            elif any(c in pattern for c in "*?["):
                self._wild.append((pattern, re.compile(fnmatch.translate(pattern))))
            else:
                self._literal.add(pattern)

    def first_match(self, module: str) -> str | None:
        """The pattern covering `module` (exact names first, then prefixes, suffixes, wildcards), or None."""
        if self._literal:
            if module in self._literal:
                return module
            parts = module.split(".")
            for cut in range(len(parts) - 1, 0, -1):
                prefix = ".".join(parts[:cut])
                if prefix in self._literal:
                    return prefix
            for cut in range(1, len(parts)):
                suffix = ".".join(parts[cut:])
                if suffix in self._literal:
                    return suffix
        for pattern, regex in self._wild:
            if regex.match(module):
                return pattern
        return None
