"""The kernel specializations the shipped config tables launch, as inputs to ahead-of-time compilation.

Each `KernelVariant` names a jit function with a typed signature and constexprs for
`triton.compiler.ASTSource` (bf16 activations, no bias), deduplicated over the (shape, M) rows of the
tables in `nvfp4_gemm_kernel`, `nvfp4_moe_kernel` and `fp8_gemm_kernel`. `report.py` compiles them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["KernelVariant", "shipped_variants"]


@dataclass(frozen=True)
class KernelVariant:
    """One compilable kernel specialization: the jit function, its typed signature and constexprs."""

    kernel: str
    config: str
    fn: Any = field(repr=False)
    signature: dict[str, str] = field(repr=False)
    constexprs: dict[str, Any] = field(repr=False)
    num_warps: int
    num_stages: int
    weight_tile: int = 0  # weight elements one program decodes per K step
    used_by: tuple[str, ...] = ()


def _gemm_signature(out_fp32: bool) -> dict[str, str]:
    return {
        "x_ptr": "*bf16",
        "w_ptr": "*i32",  # nvfp4_words layout
        "scale_ptr": "*u8",
        "global_ptr": "*fp32",
        "bias_ptr": "*bf16",
        "out_ptr": "*fp32" if out_fp32 else "*bf16",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "k_per_split": "i32",
        "stride_xm": "i32",
        "stride_wn": "i32",
        "stride_sn": "i32",
        "stride_om": "i32",
        "stride_on": "constexpr",
    }


def _grouped(rows, make) -> list[KernelVariant]:
    """One variant per distinct key, remembering which (shape, M) rows use it."""
    variants: dict[Any, KernelVariant] = {}
    for name, m, config in rows:
        key, variant = make(config)
        known = variants.get(key, variant)
        variants[key] = KernelVariant(**{**known.__dict__, "used_by": (*known.used_by, f"{name} M={m}")})
    return list(variants.values())


def shipped_variants() -> list[KernelVariant]:
    """Every distinct specialization the shipped config tables launch (bf16 activations, no bias): the
    NVFP4 kernels with the default Marlin-class PTX decode, and again with the portable decode (what fp16
    activations and `NVFP4_EXT_MARLIN_DECODE=0` run) as "portable" variants."""
    import triton.language as tl

    from .fp8_gemm_kernel import _fp8_gemm_kernel, shipped_fp8_configs
    from .nvfp4_gemm_kernel import _nvfp4_gemm_kernel, shipped_configs
    from .nvfp4_moe_kernel import _moe_down_kernel, _moe_gate_up_kernel, shipped_moe_configs

    def gemm(config, portable=False):
        split = config.split_k > 1
        label = f"{config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages}"
        label += (" split-K" if split else "") + (" portable" if portable else "")
        constexprs = {
            "stride_on": 1,
            "BLOCK_M": config.block_m,
            "BLOCK_N": config.block_n,
            "BLOCK_K": config.block_k,
            "DOT_DTYPE": tl.bfloat16,
            "HAS_BIAS": False,
            "SPLIT_K": 2 if split else 1,
            "MARLIN_DECODE": not portable,
        }
        signature = {**_gemm_signature(split), **{k: "constexpr" for k in constexprs}}
        return label, KernelVariant(
            "nvfp4_gemm",
            label,
            _nvfp4_gemm_kernel,
            signature,
            constexprs,
            config.num_warps,
            config.num_stages,
            config.block_n * config.block_k,
        )

    def fp8(config, block_scales):
        label, variant = gemm(config)
        signature = {k: v for k, v in variant.signature.items() if k != "global_ptr"}
        signature = {
            **signature,
            "w_ptr": "*u8",  # e4m3 bytes
            "scale_ptr": "*fp32",
            "stride_sb": "i32",
            "BLOCK_SCALES": "constexpr",
            "SCALE_BLOCK": "constexpr",
        }
        signature = {k: signature[k] for k in _fp8_gemm_kernel.arg_names}
        constexprs = {k: v for k, v in variant.constexprs.items() if k != "MARLIN_DECODE"}
        constexprs = {**constexprs, "BLOCK_SCALES": block_scales, "SCALE_BLOCK": 128}
        return label, KernelVariant(
            "fp8_gemm",
            label + (" block-scaled" if block_scales else " per-channel"),
            _fp8_gemm_kernel,
            signature,
            constexprs,
            config.num_warps,
            config.num_stages,
            config.block_n * config.block_k,
        )

    def moe_stage(fn, stage, block_m, tile, extra):
        label = f"{block_m}x{tile.block_n}x{tile.block_k} w{tile.num_warps} s{tile.num_stages}"
        label += "" if extra["MARLIN_DECODE"] else " portable"
        pointers = [a for a in fn.arg_names if a.endswith("_ptr")]
        types = {
            "x_ptr": "*bf16",
            "h_ptr": "*bf16",
            "global_ptr": "*fp32",
            "topk_weights_ptr": "*fp32",
            "sorted_ids_ptr": "*i32",
            "expert_ids_ptr": "*i32",
            "num_padded_ptr": "*i32",
            "w_ptr": "*i32",  # nvfp4_words layout
            "out_ptr": "*fp32" if stage == "down" else "*bf16",
        }
        signature = {a: types.get(a, "*u8") if a in pointers else "i32" for a in fn.arg_names}
        constexprs = {
            "BLOCK_M": block_m,
            "BLOCK_N": tile.block_n,
            "BLOCK_K": tile.block_k,
            "DOT_DTYPE": tl.bfloat16,
            **extra,
        }
        signature.update({k: "constexpr" for k in constexprs})
        rows = 2 * tile.block_n if stage == "gate_up" else tile.block_n  # gate and up rows side by side
        return (stage, label), KernelVariant(
            f"nvfp4_moe_{stage}",
            label,
            fn,
            signature,
            constexprs,
            tile.num_warps,
            tile.num_stages,
            rows * tile.block_k,
        )

    moe_rows = shipped_moe_configs()
    nvfp4 = []
    for portable in (False, True):
        suffix = {"MARLIN_DECODE": not portable}
        nvfp4 += [
            *_grouped(shipped_configs(), lambda c, portable=portable: gemm(c, portable)),
            *_grouped(
                moe_rows,
                lambda c, s=suffix: moe_stage(
                    _moe_gate_up_kernel, "gate_up", c.block_m, c.gate_up, {"ACTIVATION": 0, **s}
                ),
            ),
            *_grouped(
                moe_rows, lambda c, s=suffix: moe_stage(_moe_down_kernel, "down", c.block_m, c.down, s)
            ),
        ]
    return [
        *nvfp4,
        *_grouped(shipped_fp8_configs(), lambda c: fp8(c, block_scales=False)),
        *_grouped(shipped_fp8_configs(), lambda c: fp8(c, block_scales=True)),
    ]
