"""The integration tests' networks (host/fixtures.py) land on every layer they name, per family.

The WebUI tests build them for a real checkpoint; here the checkpoint is the tiny model of each
family in the ldm/sgm layout (the names A1111 uses), and the landing is checked with the same
name mapping the engine uses (itself checked against diffusers' converters in test_naming.py).
"""

from __future__ import annotations

import pytest
from safetensors.torch import save_file
from sd_layouts import ldm_state_dict, tiny_sd

from lib_scheduled_lora.host.fixtures import make_networks
from lib_scheduled_lora.naming import map_network
from lib_scheduled_lora.networks.network import load_network


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
