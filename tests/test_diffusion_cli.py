"""`nvfp4-ext generate` on a tiny DiffusionGemma: JSON contract, HF parity, NVFP4 input, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from nvfp4_ext.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    from nvfp4_ext.tiny_models import build_tiny_diffusion_gemma

    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("tiny_dg_cli"), seed=0)


@pytest.fixture(scope="module")
def nvfp4_dir(model_dir, tmp_path_factory: pytest.TempPathFactory):
    from nvfp4_ext.quantize import quantize_checkpoint

    return quantize_checkpoint(
        model_dir, tmp_path_factory.mktemp("q") / "w4a16", recipe="w4a16", progress=False
    )


def _generate_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(["generate", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_json_contract_and_hf_parity(model_dir, capsys: pytest.CaptureFixture) -> None:
    out = _generate_json(
        capsys,
        model_dir,
        "--prompt-ids",
        "2,17,5",
        "--seed",
        "3",
        "--max-new-tokens",
        "32",
        "--max-denoising-steps",
        "2",
        "--stats",
        "hf-exact",
    )
    assert len(out["token_ids"]) == 32 and out["steps"] == [2, 2]
    assert out["policy"] == {"policy": "entropy_bound", "bound": 0.1}
    model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir).eval()
    torch.manual_seed(3)
    reference = model.generate(torch.tensor([[2, 17, 5]]), max_new_tokens=32, max_denoising_steps=2)
    assert out["token_ids"] == reference.sequences[0, 3:].tolist()


def test_text_prompt_policies_and_seeds(model_dir, capsys: pytest.CaptureFixture) -> None:
    common = [model_dir, "--prompt", "w5 w6 w7", "--max-new-tokens", "16", "--max-denoising-steps", "2"]
    first = _generate_json(capsys, *common, "--policy", "fixed_k", "--k", "5", "--seed", "1")
    again = _generate_json(capsys, *common, "--policy", "fixed_k", "--k", "5", "--seed", "1")
    other = _generate_json(capsys, *common, "--policy", "fixed_k", "--k", "5", "--seed", "2")
    assert first["prompt_ids"] == [2, 5, 6, 7]  # BOS + the three words
    assert first["token_ids"] == again["token_ids"] and first["token_ids"] != other["token_ids"]
    assert first["accepted"] == [[5, 5]]
    conf = _generate_json(capsys, *common, "--policy", "confidence", "--threshold", "0.5")
    assert conf["policy"] == {"policy": "confidence", "threshold": 0.5}
    assert all(count >= 1 for count in conf["accepted"][0])


def test_nvfp4_checkpoint_generates(nvfp4_dir, model_dir, capsys: pytest.CaptureFixture) -> None:
    args = ["--prompt-ids", "2,17,5", "--max-new-tokens", "16", "--max-denoising-steps", "2", "--seed", "0"]
    quantized = _generate_json(capsys, nvfp4_dir, *args)
    plain = _generate_json(capsys, model_dir, *args)
    assert len(quantized["token_ids"]) == 16 and all(0 <= t < 4096 for t in quantized["token_ids"])
    assert quantized["steps"] == [2]
    # the same seed gives the same noise; NVFP4 weights change some argmaxes but not all of them
    agree = sum(a == b for a, b in zip(quantized["token_ids"], plain["token_ids"], strict=True))
    assert agree > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt-ids", "2,x"], "--prompt-ids: expected comma-separated integers"),
        (["--prompt-ids", "2", "--k", "3"], "--k: applies to --policy fixed_k"),
        (["--prompt-ids", "2", "--policy", "confidence", "--threshold", "1.5"], "--threshold:"),
        (["--prompt-ids", "2", "--policy", "fixed_k", "--k", "0"], "--k:"),
        (["--prompt-ids", "2", "--t-min", "-1"], "--t-min:"),
        (["--prompt-ids", "2", "--max-new-tokens", "0"], "--max-new-tokens:"),
        (["--prompt-ids", "2,99999"], "input_ids: token ids must lie in"),
    ],
)
def test_bad_flags_exit_2_with_the_field(
    model_dir, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    assert main(["generate", str(model_dir), *argv]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line


def test_bad_checkpoints_exit_2(tmp_path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", str(tmp_path / "missing"), "--prompt-ids", "2"]) == 2
    assert "model directory does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert main(["generate", str(tmp_path), "--prompt-ids", "2"]) == 2
    assert "DiffusionGemmaForBlockDiffusion only" in capsys.readouterr().err
