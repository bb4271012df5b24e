"""Greedy decoding with SGLang 0.5.23's own model classes on CPU, `--quantization nvfp4_ext` (helper process
of tests/test_producers_sglang.py; holds no tests).

Usage: `python tests/sglang_producer_driver.py MANIFEST.json RESULTS.json`. The manifest lists cases ({"id",
"path", "prompts": [[token ids]], "max_tokens", "server_args": {ServerArgs field: value}}, quantization
nvfp4_ext unless `server_args` says otherwise); the results map each id to {"tokens", "methods",
"model_class"} or, when SGLang or nvfp4_ext refuses the checkpoint, to {"error": {"type", "message",
"traceback"}} (the parent asserts the exact error).

Why a process of its own: `import sglang` patches transformers globally and, on CPU, needs torchvision from a
side folder (`prepare_cpu_import`); the transformers references are computed in the parent, untouched.

What is SGLang's and what is not. The model is built and loaded by SGLang's own loader (`get_model`: its
registry, `get_quant_config`, its weight loaders, `process_weights_after_loading`); every forward is the model
class's own `forward` with SGLang's `TorchNativeAttnBackend` (torch SDPA) on SGLang's real KV pools, one
prefill then one decode step per token. What a `ModelRunner` adds on a GPU (CUDA graphs, the scheduler, the
sampler) needs CUDA and is left out: greedy is the argmax of the logits the model's `LogitsProcessor` returns.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from nvfp4_ext.engines.sglang.cpu_support import prepare_cpu_import


def _init_distributed() -> None:
    """A world-size-1 gloo group: SGLang's parallel layers need one even at TP=1."""
    from sglang.srt.distributed import parallel_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29671"))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not torch.distributed.is_initialized():
        parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")


def _publish(path: str, server_args: dict) -> None:
    """SGLang's per-process server configuration for this checkpoint (its argument resolution runs the
    model-specific checks, e.g. which attention backends a family accepts)."""
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    if parallel_state.model_parallel_is_initialized():  # built for the previous case's context
        parallel_state.destroy_model_parallel()
    reset_context()
    args = ServerArgs(model_path=path, device="cpu", **server_args)
    publish(args, role="test", ranks=SpawnRanks(world_rank=0))
    get_parallel().override_permanently(world_group=parallel_state._WORLD)
    parallel_state.initialize_model_parallel(backend="gloo")


def _load(path: str, quantization: str | None):
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader import get_model

    model_config = ModelConfig(path, quantization=quantization, dtype="float32")
    model = get_model(model_config=model_config, load_config=LoadConfig(), device_config=DeviceConfig("cpu"))
    return model_config, model.eval()


def _kv_pool(model_config, size: int):
    """SGLang's KV pool for the model: one MHA pool, or, when sliding-window layers have their own head shape
    (Gemma 4 as SGLang's config parser flattens it: `swa_head_dim`, `swa_num_key_value_heads`), its hybrid
    `SWAKVPool` with the two shapes, KV slots shared one to one."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    from sglang.srt.configs.model_config import AttentionArch
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    text = model_config.hf_text_config
    common = dict(page_size=1, device="cpu", enable_memory_saver=False)
    if model_config.attention_arch == AttentionArch.MLA:  # DeepseekV3: one latent + rope-key row per token
        return MLATokenToKVPool(
            size=size,
            dtype=torch.float32,
            kv_lora_rank=model_config.kv_lora_rank,
            qk_rope_head_dim=model_config.qk_rope_head_dim,
            layer_num=model_config.num_hidden_layers,
            **common,
        )
    full = dict(head_num=model_config.get_num_kv_heads(1), head_dim=model_config.head_dim)
    swa_dim = getattr(text, "swa_head_dim", None)
    if swa_dim is None or swa_dim == full["head_dim"]:
        layers = model_config.num_hidden_layers
        return MHATokenToKVPool(size=size, layer_num=layers, dtype=torch.float32, **full, **common)
    types = list(text.layer_types)
    swa = dict(head_num=text.swa_num_key_value_heads, head_dim=swa_dim)
    pool = SWAKVPool(
        size=size,
        size_swa=size,
        swa_attention_layer_ids=[i for i, t in enumerate(types) if t == "sliding_attention"],
        full_attention_layer_ids=[i for i, t in enumerate(types) if t != "sliding_attention"],
        full_kv_pool_kwargs={**full, **common},
        swa_kv_pool_kwargs={**swa, **common},
        dtype=torch.float32,
        **full,
        **common,
    )
    # What SGLang's allocator sets: full slot -> SWA slot (identity here), -1 -> -1 through a last entry.
    pool.full_to_swa_index_mapping = torch.cat([torch.arange(size), torch.tensor([-1])])
    return pool


def _router_norm_as_on_cuda(model) -> None:
    """SGLang's Gemma 4 MoE router folds `scale * hidden_size**-0.5` into the weight of a
    `Gemma4RMSNorm(with_scale=False)`; its CUDA branch (`rmsnorm(x, weight)`) applies that weight, but its
    torch branch, which CPU runs, skips the weight when `with_scale` is False, so on CPU the router logits
    lack that factor and pick other experts than transformers do. Mark the router
    norms as scaled so the torch branch computes what the CUDA branch does (weight + scale_shift 0.0)."""
    from sglang.srt.models.gemma4_causal import Gemma4Router

    for module in model.modules():
        if isinstance(module, Gemma4Router):
            module.norm.with_scale = True


class _Decoder:
    """One request at a time through SGLang's KV pools and torch-native attention backend."""

    def __init__(self, model_config, model, context: int = 256):
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

        self.model = model
        self.req_pool = ReqToTokenPool(
            size=1, max_context_len=context, device="cpu", enable_memory_saver=False
        )
        self.kv_pool = _kv_pool(model_config, context + 1)
        runner = SimpleNamespace(device="cpu", req_to_token_pool=self.req_pool, token_to_kv_pool=self.kv_pool)
        self.backend = TorchNativeAttnBackend(runner)

    def _step(self, ids: list[int], start: int) -> int:
        """Run `ids` at positions start.. (a prefill when start == 0, else a decode step); the argmax of the
        last position's logits."""
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        n, total = len(ids), start + len(ids)
        slots = torch.arange(start + 1, total + 1)  # KV slot 0 is the pool's padding slot
        self.req_pool.req_to_token[1, start:total] = slots.to(torch.int32)
        common = dict(
            batch_size=1,
            input_ids=torch.tensor(ids),
            req_pool_indices=torch.tensor([1]),
            seq_lens=torch.tensor([total]),
            seq_lens_cpu=torch.tensor([total]),
            out_cache_loc=slots,
            seq_lens_sum=total,
            positions=torch.arange(start, total),
            capture_hidden_mode=CaptureHiddenMode.NULL,
        )
        if start == 0:
            batch = ForwardBatch(
                forward_mode=ForwardMode.EXTEND,
                extend_num_tokens=n,
                extend_seq_lens=torch.tensor([n]),
                extend_prefix_lens=torch.tensor([0]),
                extend_start_loc=torch.tensor([0]),
                extend_seq_lens_cpu=[n],
                extend_prefix_lens_cpu=[0],
                **common,
            )
        else:
            batch = ForwardBatch(forward_mode=ForwardMode.DECODE, **common)
        self.backend.init_forward_metadata(batch)
        with torch.no_grad(), forward_context(ForwardContext(attn_backend=self.backend), forward_batch=batch):
            out = self.model(batch.input_ids, batch.positions, batch)
        return int(out.next_token_logits[-1].argmax())

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        generated = [self._step(prompt, 0)]
        while len(generated) < max_tokens:
            generated.append(self._step(generated[-1:], len(prompt) + len(generated) - 1))
        return generated


def run_case(case: dict) -> dict:
    try:
        defaults = {"attention_backend": "torch_native", "quantization": "nvfp4_ext"}
        server_args = {**defaults, **case["server_args"]}
        _publish(case["path"], server_args)
        model_config, model = _load(case["path"], server_args["quantization"])
        _router_norm_as_on_cuda(model)
        methods = sorted(
            {type(m.quant_method).__name__ for m in model.modules() if getattr(m, "quant_method", None)}
        )
        decoder = _Decoder(model_config, model)
        tokens = [decoder.greedy(prompt, case["max_tokens"]) for prompt in case["prompts"]]
        return {"tokens": tokens, "methods": methods, "model_class": type(model).__name__}
    except Exception as exc:  # the parent asserts which error, and where it came from
        trace = traceback.format_exc()[-3000:]
        return {"error": {"type": type(exc).__name__, "message": str(exc), "traceback": trace}}


def main(manifest: str, results: str) -> None:
    prepare_cpu_import()
    from sglang.srt.plugins import load_plugins

    load_plugins()
    # SGLang's logits processor softcaps (Gemma 4) with a Triton kernel unless it runs on its CPU engine or an
    # NPU; take the torch branch its CPU engine runs (the CPU engine itself needs a CPU-built sgl-kernel).
    import sglang.srt.layers.logits_processor as logits_processor

    logits_processor._is_cpu = True
    torch.set_default_dtype(torch.float32)
    _init_distributed()
    out = {}
    for case in json.loads(Path(manifest).read_text()):
        out[case["id"]] = run_case(case)
        print(f"CASE {case['id']}: {'error' if 'error' in out[case['id']] else 'ok'}", flush=True)
        Path(results).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
