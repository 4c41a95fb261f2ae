"""`python -m lib_scheduled_lora generate` on a diffusers folder, offline."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from support.tiny_models import tiny_clip_config, tiny_pipeline

from lib_scheduled_lora.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import CLIPTextModel

    config = tiny_clip_config()
    config.vocab_size, config.bos_token_id, config.eos_token_id = 49408, 49406, 49407
    torch.manual_seed(0)
    pipe = tiny_pipeline(text_encoder=CLIPTextModel(config).eval())
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(folder)
    loras = tmp_path_factory.mktemp("loras")
    gen = torch.Generator().manual_seed(1)
    state = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn" in name:
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=gen)
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=gen)
    save_file(state, str(loras / "wday.safetensors"))
    return folder, loras


def _generate(model_dir, tmp_path, prompt, *extra):
    folder, loras = model_dir
    out = tmp_path / "out.png"
    code = main(["generate", prompt, "--model", str(folder), "--lora-dir", str(loras), "--steps", "4",
                 "--seed", "7", "-o", str(out), *extra])
    return code, out


def test_generate_writes_a_png_with_its_parameters(model_dir, tmp_path, capsys):
    code, out = _generate(model_dir, tmp_path, "a cat <lora:wday:0@0.3:1>", "--sampler", "heun")
    assert code == 0
    image = Image.open(out)
    assert image.info["parameters"].startswith("a cat <lora:wday:0@0.3:1>\nSteps: 4, Sampler: Heun")
    printed = capsys.readouterr().out
    # Heun, 4 steps: evaluations at steps 0, 1, 1, 2, 2, 3, 3; the switch is at 1/3 >= 0.3.
    assert "wday: unet multipliers per evaluation [0, 1, 1, 1, 1, 1, 1]" in printed


def test_schedule_changes_the_image(model_dir, tmp_path):
    images = {}
    for label, prompt in (("base", "a cat"), ("full", "a cat <lora:wday:1>"), ("sched", "a cat <lora:wday:0@0.5:1>")):
        code, out = _generate(model_dir, tmp_path, prompt)
        assert code == 0
        images[label] = Image.open(out).tobytes()
    assert len(set(images.values())) == 3


def test_bad_input_exits_2_with_the_column(model_dir, tmp_path):
    folder, loras = model_dir
    result = subprocess.run(
        [sys.executable, "-m", "lib_scheduled_lora", "generate", "a <lora:wday:0@0.3:abc>", "--model", str(folder),
         "--lora-dir", str(loras), "-o", str(tmp_path / "x.png")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "error: <lora:wday:0@0.3:abc>: 'abc' at column 18 is not a number" in result.stderr
    assert "Loading pipeline" not in result.stderr  # rejected before the model is loaded
    assert not (tmp_path / "x.png").exists()


def test_missing_network_exits_2(model_dir, tmp_path, capsys):
    code, out = _generate(model_dir, tmp_path, "a cat <lora:nobody:1>")
    assert code == 2
    assert "no network named 'nobody'" in capsys.readouterr().err
    assert not out.exists()


def test_generate_defaults_to_the_built_in_demo_model(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["generate", "a white wday <lora:wday_locon:0@0.5:2>", "--steps", "4", "--sampler", "ddim",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model: built-in demo model" in printed
    assert "wday_locon: unet multipliers per evaluation [0, 0, 2, 2]" in printed  # 2/3 >= 0.5
    assert "Model: built-in demo model" in Image.open(out).info["parameters"]


def test_a_merged_demo_model_draws_what_the_live_network_draws(tmp_path, capsys):
    """`merge demo` writes a folder `generate --model` takes; baked at 2, the network gives the image
    the scheduled engine gives at constant 2, up to the merged fp16 weights' rounding."""
    import numpy as np

    merged = tmp_path / "demo-wday"
    assert main(["merge", "demo", "--lora", "wday_locon:2", "-o", str(merged), "--quiet"]) == 0
    assert "wday_locon at 2: 125 layer(s) merged, 0 unmatched" in capsys.readouterr().out
    common = ["--steps", "6", "--sampler", "ddim", "--seed", "3"]
    assert main(["generate", "a white wday", "--model", str(merged), "-o", str(tmp_path / "baked.png"), *common]) == 0
    assert "model: demo-wday" in capsys.readouterr().out
    assert main(["generate", "a white wday <lora:wday_locon:2>", "-o", str(tmp_path / "live.png"), *common]) == 0
    baked = np.asarray(Image.open(tmp_path / "baked.png"), dtype=np.int16)
    live = np.asarray(Image.open(tmp_path / "live.png"), dtype=np.int16)
    base_png = tmp_path / "base.png"
    assert main(["generate", "a white wday", "-o", str(base_png), *common]) == 0
    base = np.asarray(Image.open(base_png), dtype=np.int16)
    assert np.abs(baked - live).max() <= 3 and np.abs(baked - live).mean() < 0.5
    assert np.abs(base - live).mean() > 10  # the network does change the image
