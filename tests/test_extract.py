"""Extracting a LoRA from a fine-tune: round trip through a bake, lycoris' extractor, layouts.

* Round trip: bake a rank-2 LoRA/LoCon into a tiny checkpoint (the ``merge`` command's code), then
  extract at rank 2 from (base, baked): every layer's ΔW comes back, the rest counts as unchanged.
* ``lycoris.utils.extract_linear`` / ``extract_conv`` (independent code) on the same per-layer
  differences give the same products.
* The base may be a diffusers folder and the fine-tune a single file: layers meet by name.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support.random_networks import write
from support.sd_layouts import kohya_lora_state, ldm_state_dict, tiny_sd

from lib_scheduled_lora.commands import extract as extract_command
from lib_scheduled_lora.core.extract import extract_lora
from lib_scheduled_lora.core.lowrank import RankRule
from lib_scheduled_lora.core.merge import merge_model
from lib_scheduled_lora.core.model_reader import ModelReader
from lib_scheduled_lora.core.network_writer import METADATA_KEY, file_sha256
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.errors import ModelFormatError, ScheduledLoraError

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    model = tiny_sd("sd1")
    save_file(ldm_state_dict(model), root / "base.safetensors")
    lora = write(kohya_lora_state(model, rank=2, seed=11, scale=0.3), root / "lora.safetensors")
    network = load_network(lora)
    merge_model(root / "base.safetensors", [(network, 1.0)], root / "tuned.safetensors", dtype=torch.float32)
    return root, model, network


def test_round_trip_recovers_the_baked_lora(tuned):
    root, _, network = tuned
    with ModelReader(root / "base.safetensors") as base, ModelReader(root / "tuned.safetensors") as fine:
        extracted = extract_lora(base, fine, RankRule("rank", 2, conv_rank=2), device="cpu")
        slots = {name: slot for slot, name in base.index.kohya_names.items()}
        got = {layer.key: layer for layer in extracted.layers}
        assert set(got) == {k for k in network.modules if len(slots[k].shape) in (2, 4)}
        for key, module in network.modules.items():
            base_weight = base.read_slot(slots[key])
            want = module.weight_delta(base_weight)
            up, down = extracted.tensors[f"{key}.lora_up.weight"], extracted.tensors[f"{key}.lora_down.weight"]
            ours = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(want.shape)
            torch.testing.assert_close(ours, want, atol=2e-5, rtol=1e-3, msg=key)
            assert got[key].fro_kept == pytest.approx(1.0, abs=1e-5)  # a rank-2 ΔW: nothing lost
        assert extracted.unchanged == len(slots) - len(got)


def test_conv_layers_only_with_a_conv_rank(tuned):
    root, _, _ = tuned
    with ModelReader(root / "base.safetensors") as base, ModelReader(root / "tuned.safetensors") as fine:
        extracted = extract_lora(base, fine, RankRule("rank", 2), device="cpu")
    assert extracted.layers and all(len(r.shape) == 2 or r.shape[2:] == (1, 1) for r in extracted.layers)
    assert any("conv" in name or "in_layers_2" in name for name in extracted.not_extracted)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_matches_lycoris_extractor_on_a_model_layer(tuned, kind):
    pytest.importorskip("lycoris")
    from lycoris.utils import extract_conv, extract_linear

    root, _, _ = tuned
    with ModelReader(root / "base.safetensors") as base, ModelReader(root / "tuned.safetensors") as fine:
        extracted = extract_lora(base, fine, RankRule("rank", 1, conv_rank=1), device="cpu")
        layer = next(r for r in extracted.layers if (len(r.shape) == 4 and r.shape[2] == 3) == (kind == "conv"))
        slot = base.index.slots[layer.key]
        delta = fine.read_slot(fine.index.slots[layer.key]) - base.read_slot(slot)
    (down, up, _), mode = (extract_conv if kind == "conv" else extract_linear)(delta, "fixed", 1)
    assert mode == "low rank"
    theirs = (up.reshape(up.shape[0], -1) @ down.reshape(1, -1)).reshape(delta.shape)
    ours = (extracted.tensors[f"{layer.key}.lora_up.weight"].reshape(delta.shape[0], 1)
            @ extracted.tensors[f"{layer.key}.lora_down.weight"].reshape(1, -1)).reshape(delta.shape)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_a_diffusers_base_and_a_single_file_fine_tune(tuned, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from support.tiny_models import tiny_vae

    root, model, network = tuned
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=copy.deepcopy(model.text_encoder), tokenizer=None,
        unet=copy.deepcopy(model.unet), scheduler=DDIMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "base")
    with ModelReader(tmp_path / "base") as base, ModelReader(root / "tuned.safetensors") as fine:
        extracted = extract_lora(base, fine, RankRule("rank", 2, conv_rank=2), device="cpu")
    assert {layer.key for layer in extracted.layers} == set(network.modules)


def test_another_architecture_is_refused(tuned, tmp_path):
    root, _, _ = tuned
    save_file(ldm_state_dict(tiny_sd("sdxl")), tmp_path / "xl.safetensors")
    with ModelReader(root / "base.safetensors") as base, ModelReader(tmp_path / "xl.safetensors") as other:
        with pytest.raises(ModelFormatError, match=r"xl\.safetensors: is sdxl .*the base model base\.safetensors is sd1"):
            extract_lora(base, other, RankRule("rank", 2))


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    extract_command.add_arguments(parser)
    try:
        return extract_command.run(parser.parse_args(argv))
    except ScheduledLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def test_extract_command(tuned, tmp_path, capsys):
    root, _, network = tuned
    out = tmp_path / "x.safetensors"
    base, fine = str(root / "base.safetensors"), str(root / "tuned.safetensors")
    assert _run([base, fine, "-o", str(out), "--rank", "2", "--conv-rank", "2", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert set(load_network(out).modules) == set(network.modules)
    with safe_open(str(out), "pt") as f:
        made = json.loads(f.metadata()[METADATA_KEY])
    assert made["operation"] == "extract"
    assert [(s["file"], s["role"], s["sha256"]) for s in made["sources"]] == [
        ("base.safetensors", "base", file_sha256(base)), ("tuned.safetensors", "tuned", file_sha256(fine))]
    assert _run([base, base, "-o", str(tmp_path / "y.safetensors"), "--rank", "2", "--quiet"]) == 2
    assert "does not differ" in capsys.readouterr().err
    assert _run([base, fine, "-o", str(tmp_path / "z.safetensors"), "--quiet"]) == 2
    assert "extract: needs --rank N" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists() and not (tmp_path / "z.safetensors").exists()
