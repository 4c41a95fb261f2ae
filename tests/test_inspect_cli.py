"""``python -m lib_scheduled_lora inspect FILE``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_scheduled_lora import cli

REPO = Path(__file__).resolve().parent.parent
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(autouse=True)
def only_the_inspect_command(monkeypatch):
    # The dispatcher imports every command module to build its parser; these tests are about
    # `inspect` alone.
    monkeypatch.setattr(cli, "COMMANDS", {"inspect": cli.COMMANDS["inspect"]})


def rand(*shape):
    return torch.randn(*shape)


@pytest.fixture
def sd1_file(tmp_path):
    tensors = {
        f"{Q}.lora_down.weight": rand(8, 320), f"{Q}.lora_up.weight": rand(320, 8), f"{Q}.alpha": torch.tensor(4.0),
        f"{K2}.lora_down.weight": rand(8, 768), f"{K2}.lora_up.weight": rand(320, 8), f"{K2}.alpha": torch.tensor(4.0),
        f"{K2}.dora_scale": rand(320, 1).abs(),
        f"{CONV}.hada_w1_a": rand(320, 4), f"{CONV}.hada_w1_b": rand(4, 320 * 9), f"{CONV}.hada_w2_a": rand(320, 4),
        f"{CONV}.hada_w2_b": rand(4, 320 * 9), f"{CONV}.alpha": torch.tensor(1.0),
        f"{TE}.lora_down.weight": rand(8, 768), f"{TE}.lora_up.weight": rand(768, 8),
        "lora_unet_mystery.oft_blocks": rand(2, 2),
    }
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return path


def run(capsys, *argv):
    code = cli.main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_report(capsys, sd1_file):
    code, out, err = run(capsys, str(sd1_file))
    assert code == 0 and err == ""
    assert f"file: {sd1_file}" in out
    assert "base model: SD 1.x (cross-attention context dim 768; " in out
    assert "metadata ss_base_model_version='sd_v1'" in out
    assert "modules: 4 (UNet 3, text encoder 1)" in out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert lines["self-attention"].split() == ["self-attention", "1", "lora", "8", "4", "no"]
    assert lines["cross-attention"].split() == ["cross-attention", "1", "lora", "8", "4", "yes"]
    assert lines["resnet conv"].split() == ["resnet", "conv", "1", "loha", "4", "1", "no"]
    assert lines["text-encoder attention"].split() == ["text-encoder", "attention", "1", "lora", "8", "=rank", "no"]
    assert "unrecognised keys (1, not applied):" in out and "lora_unet_mystery.oft_blocks" in out


def test_module_listing(capsys, sd1_file):
    code, out, _ = run(capsys, str(sd1_file), "--modules")
    assert code == 0
    assert any(line.split()[:2] == [CONV, "loha"] for line in out.splitlines())


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty file"),
        (b"\x00" * 3, "not a safetensors file"),
        (b"\xff" * 64, "not a safetensors file"),
    ],
)
def test_unreadable_files_give_one_line_and_exit_2(capsys, tmp_path, content, problem):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    code, out, err = run(capsys, str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and problem in err


def test_truncated_and_non_network_files(capsys, tmp_path, sd1_file):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(sd1_file.read_bytes()[:-100])
    code, _, err = run(capsys, str(truncated))
    assert code == 2 and err.startswith(f"error: {truncated}: truncated")
    unrelated = tmp_path / "model.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": rand(4, 4)}, str(unrelated))
    code, _, err = run(capsys, str(unrelated))
    assert code == 2 and "no LoRA/LyCORIS keys" in err and str(unrelated) in err
    pickled = tmp_path / "net.ckpt"
    torch.save({"a": rand(2)}, pickled)
    code, _, err = run(capsys, str(pickled))
    assert code == 2 and "pickle" in err


def test_python_dash_m(tmp_path):
    """The real entry point, in a subprocess: every command's parser builds, errors exit with 2."""
    missing = tmp_path / "missing.safetensors"
    result = subprocess.run([sys.executable, "-m", "lib_scheduled_lora", "inspect", str(missing)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: {missing}: file not found"
