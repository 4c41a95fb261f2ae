"""The integration tests' networks (tests/support/webui_networks.py) land on every layer they name, per family.

The WebUI tests build them for a real checkpoint; here the checkpoint is the tiny model of each
family in the ldm/sgm layout (the names A1111 uses), and the landing is checked with the same
name mapping the engine uses (itself checked against diffusers' converters in test_naming.py).
"""

from __future__ import annotations

import pytest
from safetensors.torch import save_file
from support.sd_layouts import ldm_state_dict, tiny_sd
from support.webui_networks import make_networks, make_networks_for_webui

from lib_scheduled_lora.core.naming import map_network
from lib_scheduled_lora.core.networks.loader import load_network


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_fixture_networks_land_on_the_unet_and_text_encoders(tmp_path, family):
    state = ldm_state_dict(tiny_sd(family))
    checkpoint = tmp_path / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint))
    paths = make_networks(checkpoint, tmp_path / "Lora", text_encoder=True, prefix=family)
    assert sorted(paths) == [f"{family}_locon", f"{family}_loha", f"{family}_lora"]
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for path in paths.values():
        network = load_network(path)
        mapping = map_network(network.modules, shapes)
        assert mapping.unmatched == [], mapping.unmatched_reasons[:3]
        components = {t.component for t in mapping.targets}
        assert components >= {"unet", "te"} if family != "sdxl" else components >= {"unet", "te", "te2"}
        if family in ("sd2", "sdxl"):  # OpenCLIP: q, k and v are row thirds of one fused weight
            assert any(t.rows is not None for t in mapping.targets)


def test_networks_for_a_running_webui_use_its_loaded_checkpoint(tmp_path):
    state = ldm_state_dict(tiny_sd("sd1"))
    for name in ("a", "b"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
    api = {
        "/sdapi/v1/sd-models": [
            {"title": f"{n}.safetensors [x]", "model_name": n, "filename": str(tmp_path / f"{n}.safetensors")}
            for n in ("a", "b")
        ],
        "/sdapi/v1/options": {"sd_model_checkpoint": "b.safetensors [x]"},
    }
    posted = []
    seen = []

    def fake_make(checkpoint, lora_dir):  # the checkpoint chosen is what matters here
        seen.append(checkpoint)
        return {}

    from support import webui_networks as fixtures

    original, fixtures.make_networks = fixtures.make_networks, fake_make
    try:
        make_networks_for_webui(api.get, posted.append, tmp_path / "Lora")
    finally:
        fixtures.make_networks = original
    assert seen == [str(tmp_path / "b.safetensors")] and posted == ["/sdapi/v1/refresh-loras"]

    # SD.Next names its diffusers folders relative to its root ("models/Diffusers/<name>").
    api["/sdapi/v1/sd-models"] = [{"title": "Diffusers/c", "model_name": "Diffusers/c", "filename": "models/Diffusers/c"}]
    api["/sdapi/v1/options"] = {"sd_model_checkpoint": "Diffusers/c"}
    fixtures.make_networks = fake_make
    try:
        make_networks_for_webui(api.get, posted.append, tmp_path / "Lora", root="/sdnext")
    finally:
        fixtures.make_networks = original
    assert seen[-1] == "/sdnext/models/Diffusers/c"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fixture_networks_for_a_diffusers_folder_land_on_its_components(tmp_path, family):
    """SD.Next's models are diffusers folders (unet/, text_encoder/, text_encoder_2/)."""
    model = tiny_sd(family)
    folder = tmp_path / "model"
    for name, module in model.components.items():
        (folder / name).mkdir(parents=True)
        filename = "diffusion_pytorch_model.safetensors" if name == "unet" else "model.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / name / filename))
    paths = make_networks(folder, tmp_path / "Lora", text_encoder=True, prefix=family)
    shapes = {k: tuple(v.shape) for k, v in model.diffusers_state_dict().items()}
    for kind, path in paths.items():
        mapping = map_network(load_network(path).modules, shapes)
        assert mapping.unmatched == [], mapping.unmatched_reasons[:3]
        components = {t.component for t in mapping.targets}
        assert components >= ({"unet", "te", "te2"} if family == "sdxl" else {"unet", "te"})
        if kind.endswith(("locon", "loha")):
            assert any(len(shapes[t.weight]) == 4 and shapes[t.weight][2] == 3 for t in mapping.targets)  # 3x3 convs
