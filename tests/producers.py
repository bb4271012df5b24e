"""Checkpoints made by the tools that make them in the wild, and references dequantized by those tools' own
code.

Holds no tests itself. The point: an NVFP4/FP8 checkpoint written by NVIDIA ModelOpt (`mtq.quantize` +
`export_hf_checkpoint`) and dequantized back by ModelOpt (`NVFP4QTensor.dequantize`, `FP8QTensor.dequantize`)
gives a reference that shares no code with `nvfp4_ext`, so a misreading of the format on our side cannot
cancel out. Everything runs on CPU from tiny random models (`nvfp4_ext.tiny_models`); nothing is downloaded.

ModelOpt on CPU (0.47): max calibration and the export run; AWQ, four-over-six and the MSE sweep need CUDA
(see docs/checkpoint.md). The exporter writes neither the tokenizer nor `config.architectures` by itself: both
are copied from the source directory.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import torch

__all__ = [
    "MODELOPT_RECIPES",
    "assert_generate_matches_hf",
    "assert_inspect_matches",
    "fuse_experts_like_source",
    "in_ci",
    "llmc_produce",
    "modelopt_case",
    "modelopt_dequantize",
    "modelopt_export",
    "modelopt_quant_config",
    "producer_state",
    "producer_state_file",
    "read_tensors",
    "selected_params",
    "write_float32_reference",
]

# Our short name -> the ModelOpt config it uses (attribute of `modelopt.torch.quantization`), or a recipe
# assembled from ModelOpt's own entries ("mixed": NVFP4 MLP/experts + FP8 attention, the shape of NVIDIA's
# MIXED_PRECISION releases).
MODELOPT_RECIPES: dict[str, str] = {
    "nvfp4": "NVFP4_DEFAULT_CFG",
    "w4a16": "W4A16_NVFP4_CFG",
    "experts-only": "NVFP4_EXPERTS_ONLY_CFG",
    "mlp-only": "NVFP4_MLP_ONLY_CFG",
    "fp8": "FP8_DEFAULT_CFG",
    "mixed": "NVFP4_MLP_ONLY_CFG + FP8_DEFAULT_CFG entries for *self_attn*",
}


def in_ci() -> bool:
    """CI=true (as tests/conftest.py reads it): a missing producer is then a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def modelopt_quant_config(recipe: str, *, kv_fp8: bool = False) -> dict:
    """The `mtq.quantize` config of a recipe (a deep copy of ModelOpt's own), optionally with FP8_KV_CFG's
    entries appended (ModelOpt's documented way to add FP8 KV-cache scales)."""
    import modelopt.torch.quantization as mtq

    if recipe not in MODELOPT_RECIPES:
        raise ValueError(f"unknown ModelOpt recipe {recipe!r} (known: {', '.join(MODELOPT_RECIPES)})")
    if recipe == "mixed":
        config = copy.deepcopy(mtq.NVFP4_MLP_ONLY_CFG)
        fp8 = {
            entry["quantizer_name"]: entry["cfg"]
            for entry in mtq.FP8_DEFAULT_CFG["quant_cfg"]
            if entry.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer") and "cfg" in entry
        }
        config["quant_cfg"] += [
            {"quantizer_name": f"*self_attn*{kind}", "cfg": copy.deepcopy(cfg)} for kind, cfg in fp8.items()
        ]
    else:
        config = copy.deepcopy(getattr(mtq, MODELOPT_RECIPES[recipe]))
    if kv_fp8:
        config["quant_cfg"] = list(config["quant_cfg"]) + copy.deepcopy(list(mtq.FP8_KV_CFG["quant_cfg"]))
    return config


def calibration_batches(vocab_size: int, *, batches: int = 4, seq_len: int = 24, seed: int = 0) -> list:
    """Deterministic token-id batches (the tiny models' word vocabulary has no natural text)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab_size, (1, seq_len), generator=gen) for _ in range(batches)]


# Architectures AutoModelForCausalLM refuses ("Unrecognized configuration class ... DiffusionGemmaConfig"):
# the model object of the checkpoint's own class is built and handed to ModelOpt instead.
OWN_CLASS_ARCHITECTURES = ("DiffusionGemmaForBlockDiffusion",)


def modelopt_export(
    source_dir: str | Path, out_dir: str | Path, recipe: str, *, kv_fp8: bool = False
) -> Path:
    """Quantize a bf16 HF checkpoint with ModelOpt (`mtq.quantize`, max calibration on CPU) and write it with
    `export_hf_checkpoint`, plus the source's tokenizer files, and record ModelOpt's per-module decisions
    (`producer_state`) in `producer_state_file(out_dir)`. Returns `out_dir`."""
    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    source, out = Path(source_dir), Path(out_dir)
    architectures = json.loads((source / "config.json").read_text())["architectures"]
    loader = (
        getattr(transformers, architectures[0])
        if architectures[0] in OWN_CLASS_ARCHITECTURES
        else transformers.AutoModelForCausalLM
    )
    model = loader.from_pretrained(source, dtype=torch.bfloat16).eval()
    batches = calibration_batches(model.config.get_text_config().vocab_size)

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for ids in batches:
                m(ids)

    mtq.quantize(model, modelopt_quant_config(recipe, kv_fp8=kv_fp8), forward_loop)
    state = producer_state(model)
    model.config.architectures = architectures  # the exporter reads it to name the checkpoint's model
    out.mkdir(parents=True, exist_ok=True)
    export_hf_checkpoint(model, export_dir=out)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    producer_state_file(out).write_text(json.dumps(state, indent=1, sort_keys=True))
    return out


def producer_state_file(checkpoint_dir: str | Path) -> Path:
    """Where a producer's own per-module decisions are kept: beside the checkpoint, not inside it."""
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.parent / f"{checkpoint_dir.name}.producer.json"


def producer_state(model: torch.nn.Module) -> dict[str, str]:
    """What ModelOpt decided, read from its quantizers after `mtq.quantize` (not from any file): exported
    module name -> "nvfp4" (W4A4), "nvfp4_w4a16", or "fp8". Fused experts
    (`experts.gate_up_proj_weight_quantizers.E`) are named the way the exporter splits them
    (`experts.E.gate_proj` / `.up_proj` / `.down_proj`)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    def kind(weight_q: TensorQuantizer, input_q: TensorQuantizer | None) -> str:
        if tuple(weight_q.num_bits) == (2, 1) and (weight_q.block_sizes or {}).get(-1) == 16:
            acts = input_q is not None and input_q.is_enabled
            return "nvfp4" if acts else "nvfp4_w4a16"
        if tuple(weight_q.num_bits) == (4, 3) and not weight_q.block_sizes:
            return "fp8"
        raise NotImplementedError(f"unmapped ModelOpt weight quantizer {weight_q}")

    modules = dict(model.named_modules())
    state: dict[str, str] = {}
    for name, module in modules.items():
        if not isinstance(module, TensorQuantizer) or not module.is_enabled:
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf == "weight_quantizer":
            state[parent] = kind(module, modules.get(f"{parent}.input_quantizer"))
            continue
        owner, _, group = parent.rpartition(".")
        if group.endswith("_weight_quantizers") and leaf.isdigit():
            proj = group.removesuffix("_weight_quantizers")
            value = kind(module, modules.get(f"{owner}.{proj}_input_quantizer"))
            shards = ("gate_proj", "up_proj") if proj == "gate_up_proj" else (proj,)
            for shard in shards:
                state[f"{owner}.{leaf}.{shard}"] = value
    return state


def _modelopt_dequantize_tensor(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """ModelOpt's own dequantization of one exported module's weight, in float32. The format is the one
    ModelOpt's exporter gives the tensors: packed uint8 + `weight_scale_2` is NVFP4, an fp8 weight is FP8."""
    from modelopt.torch.quantization.qtensor.fp8_tensor import FP8QTensor
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    packed = tensors[f"{module}.weight"]
    scale = tensors[f"{module}.weight_scale"]
    if packed.dtype == torch.uint8 and f"{module}.weight_scale_2" in tensors:
        shape = (*packed.shape[:-1], packed.shape[-1] * 2)
        qtensor = NVFP4QTensor(torch.Size(shape), torch.float32, packed)
        return qtensor.dequantize(
            torch.float32,
            scale=scale,
            double_scale=tensors[f"{module}.weight_scale_2"].float(),
            block_sizes={-1: 16},
        )
    if packed.dtype == torch.float8_e4m3fn:
        qtensor = FP8QTensor(packed.shape, torch.float32, packed)
        return qtensor.dequantize(torch.float32, scale=scale.float())
    raise NotImplementedError(f"no ModelOpt dequantizer wired for {module} ({packed.dtype})")


def fuse_experts_like_source(tensors: dict[str, torch.Tensor], source_keys: set[str]) -> dict:
    """Per-expert `experts.E.{gate,up,down}_proj.weight` back into the source's fused 3-D
    `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] when the source stored them fused
    (Gemma 4); per-expert sources (Qwen3-MoE) are loaded per expert by transformers itself."""
    fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if "experts" in parts:
            i = parts.index("experts")
            if parts[i + 1].isdigit() and f"{'.'.join(parts[: i + 1])}.gate_up_proj" in source_keys:
                prefix = ".".join(parts[: i + 1])
                fused.setdefault(prefix, {}).setdefault(int(parts[i + 1]), {})[parts[i + 2]] = value
                continue
        out[key] = value
    for prefix, experts in fused.items():
        order = sorted(experts)
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in order]
        )
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
    return out


def modelopt_dequantize(export_dir: str | Path, source_dir: str | Path, out_dir: str | Path) -> Path:
    """A float32 HF checkpoint of a ModelOpt export, every quantized weight dequantized by ModelOpt's own
    `NVFP4QTensor.dequantize` / `FP8QTensor.dequantize`; scales (incl. KV `k_scale`/`v_scale`, which the
    engines apply only with an FP8 KV cache) dropped; the source's config (no quantization_config) and
    tokenizer. Returns `out_dir`."""
    export_dir = Path(export_dir)
    tensors = read_tensors(export_dir)
    weights: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        module, _, suffix = key.rpartition(".")
        if suffix in ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale"):
            continue
        if suffix == "weight" and f"{module}.weight_scale" in tensors:
            weights[key] = _modelopt_dequantize_tensor(tensors, module)
        else:
            weights[key] = value.float()
    return write_float32_reference(weights, source_dir, out_dir)


def read_tensors(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files (tiny test checkpoints only)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    return tensors


def write_float32_reference(
    weights: dict[str, torch.Tensor], source_dir: str | Path, out_dir: str | Path
) -> Path:
    """Save producer-dequantized float32 weights as an unquantized HF checkpoint: experts fused back when the
    source stored them fused, the source's config (without quantization_config) and tokenizer files."""
    from safetensors.torch import save_file

    source, out = Path(source_dir), Path(out_dir)
    weights = fuse_experts_like_source(weights, set(read_tensors(source)))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out


def assert_inspect_matches(checkpoint_dir: str | Path, decisions: dict[str, str]) -> dict:
    """`nvfp4-ext inspect`'s per-module schemes equal a producer's own decisions (module -> scheme); every
    other module it lists is unquantized, and the per-scheme parameter totals add up. Returns the report."""
    from nvfp4_ext.checkpoint.inspect import inspect_checkpoint

    report = inspect_checkpoint(str(checkpoint_dir))
    table = {row["name"]: row["scheme"] for row in report["modules"]}
    assert set(decisions) <= set(table), sorted(set(decisions) - set(table))
    assert {name: table[name] for name in decisions} == decisions
    assert {scheme for name, scheme in table.items() if name not in decisions} == {"unquantized"}
    for scheme in set(decisions.values()):
        params = sum(row["params"] for row in report["modules"] if row["scheme"] == scheme)
        assert report["summary"]["by_scheme"][scheme]["params"] == params
    return report


def modelopt_case(
    source_dir: str | Path, out_root: str | Path, recipe: str, *, kv_fp8: bool = False, name: str = ""
) -> dict[str, Path]:
    """A ModelOpt export of `source_dir` and its ModelOpt-dequantized float32 reference under `out_root`
    (`modelopt-NAME` and `modelopt-NAME-dequantized`, NAME defaulting to the recipe), each built once."""
    source, root = Path(source_dir), Path(out_root)
    export = root / f"modelopt-{name or recipe}"
    reference = root / f"modelopt-{name or recipe}-dequantized"
    if not export.is_dir():
        modelopt_export(source, export, recipe, kv_fp8=kv_fp8)
    if not reference.is_dir():
        modelopt_dequantize(export, source, reference)
    return {"root": root, "source": source, "export": export, "reference": reference}


LLMC_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "llmc" / "bin" / "python"


def llmc_produce(jobs: list[tuple[Path, Path, Path, str]]) -> dict[str, dict]:
    """Run llm-compressor (`tests/llmc_produce.py` in `.venv/llmc`, one subprocess for all jobs) on
    (source, checkpoint out, reference out, scheme) jobs; returns checkpoint dir -> what it reported
    (versions, per-module decisions). Without that venv the caller's test skips, or fails under CI=true."""
    import pytest

    if not LLMC_PYTHON.exists():
        message = f"llm-compressor venv missing ({LLMC_PYTHON}); run scripts/install.sh"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    args = [str(item) for job in jobs for item in job]
    proc = subprocess.run(
        [str(LLMC_PYTHON), str(Path(__file__).parent / "llmc_produce.py"), *args],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    produced = {}
    for line in proc.stdout.splitlines():
        if line.startswith("PRODUCED="):
            info = json.loads(line.removeprefix("PRODUCED="))
            produced[info["out"]] = info
    assert proc.returncode == 0 and len(produced) == len(jobs), proc.stderr[-4000:]
    return produced


def selected_params(request, module_name: str, param: str) -> set:
    """The values of parameter `param` of the session's collected, not explicitly skipped tests of one
    module: what a session fixture that builds every case at once has to build."""
    return {
        item.callspec.params[param]
        for item in request.session.items
        if item.module.__name__ == module_name
        and hasattr(item, "callspec")
        and param in item.callspec.params
        and not item.get_closest_marker("skip")
    }


def assert_generate_matches_hf(checkpoint: Path, reference: Path, capsys) -> None:
    """`nvfp4-ext generate --stats hf-exact` on a quantized DiffusionGemma decodes exactly the tokens HF's own
    `generate` decodes on the producer-dequantized `reference`, same prompt and seed."""
    import transformers

    from nvfp4_ext.cli import main

    args = ["--prompt-ids", "2,17,5", "--seed", "3", "--max-new-tokens", "32", "--max-denoising-steps", "2"]
    capsys.readouterr()
    assert main(["generate", str(checkpoint), *args, "--stats", "hf-exact", "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(reference).eval()
    torch.manual_seed(3)
    expected = model.generate(torch.tensor([[2, 17, 5]]), max_new_tokens=32, max_denoising_steps=2)
    assert tokens == expected.sequences[0, 3:].tolist()
