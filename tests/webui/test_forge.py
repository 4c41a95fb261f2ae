"""Forge main and Forge Neo specifics in the real host (see conftest.py for how to run): what the
adapter detected, text-encoder schedules on a full-width SD 1.5 text encoder, and the on-the-fly
LoRA mode. The general behaviour (constant == plain tag, schedules, restore after interrupt, skip
and hires, bad tags, Heun, XYZ) is test_api.py's, which runs on every kind.

On-the-fly tests need the server started with an "(fp16 LoRA)" storage option (Forge reads it at
start-up): e.g. a copy of config.json with ``"forge_unet_storage_dtype": "float8-e4m3fn (fp16
LoRA)"`` (Forge main; it bakes fp32 storage whatever the option) or ``"Automatic (fp16 LoRA)"``
(Neo), passed with ``WEBUI_ARGS="--ui-settings-file COPY"``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from .server import FORGE, NEO, host_kind, require_kind
from .test_api import same


@pytest.fixture(scope="module")
def forge_info(webui):
    require_kind(FORGE, NEO)
    webui.txt2img("a cat", steps=1)  # loads the model
    status, info = webui.get("/scheduled-lora/v1/info")
    assert status == 200, info
    return info


@pytest.fixture(scope="module")
def te_network(webui, forge_info):
    """A LoRA with text-encoder layers (the full-width SD 1.5 encoder takes it without NaNs)."""
    from support.webui_networks import loaded_checkpoint, make_networks

    checkpoint = loaded_checkpoint(lambda path: webui.get(path)[1])
    make_networks(checkpoint, Path(os.environ["WEBUI_PATH"]) / "models" / "Lora", text_encoder=True, prefix="slte")
    webui.post("/sdapi/v1/refresh-loras", {})
    return "slte_lora"


def on_the_fly(info) -> bool:
    return bool(info["forge"]["on_the_fly"]["unet"])


def _diff(a, b) -> tuple[float, int]:
    d = np.abs(a[0].astype(int) - b[0].astype(int))
    return float(d.mean()), int(d.max())


def test_the_adapter_detected_this_forge(forge_info):
    kind = host_kind()
    assert forge_info["host"] == "forge"
    expected = {FORGE: {"FORGE_MAIN"}, NEO: {"NEO_2026_08", "NEO_2026_09"}}[kind]
    assert forge_info["forge"]["layout"] in expected, forge_info
    assert forge_info["forge"]["family"] in ("sd1", "sdxl", "sd2")


def test_te_schedule(webui, te_network):
    """Text-encoder strengths are applied where Forge encodes the prompt: ours at a constant
    equals the host's own te-only tag; a te schedule over prompt-editing segments lands in between."""
    name = te_network
    none, _ = webui.txt2img("a cat")
    host, _ = webui.txt2img(f"a cat <lora:{name}:1:0>")
    ours, _ = webui.txt2img(f"a cat <lora:{name}:te=1:unet=0:hr=0>")
    assert _diff(host, none)[0] > 0.5  # the text encoder part alone moves the image
    mean, peak = _diff(ours, host)
    assert mean < 0.05 and peak <= 3, (mean, peak)  # float rounding (exact on the fly)
    edit = "a cat [red:blue:0.5]"
    unet_off = "unet=0@0,0@1"
    off, _ = webui.txt2img(f"{edit} <lora:{name}:0:0>", steps=8)
    on, _ = webui.txt2img(f"{edit} <lora:{name}:1:0>", steps=8)
    down, _ = webui.txt2img(f"{edit} <lora:{name}:te=1@0.5:0:{unet_off}>", steps=8)
    assert not same(down, off) and not same(down, on)
    again, _ = webui.txt2img("a cat")
    assert same(none, again)


def test_on_the_fly_constant_equals_the_hosts_own_tag(webui, forge_info):
    if not on_the_fly(forge_info):
        pytest.skip("the server applies LoRAs baked; start it with an '(fp16 LoRA)' storage option (module docstring)")
    none1, _ = webui.txt2img("a cat")
    host, _ = webui.txt2img("a cat <lora:sl_lora:0.4>")
    ours, _ = webui.txt2img("a cat <lora:sl_lora:0.4:hr=0.3>")
    assert same(host, ours)  # the host's own merge, our multiplier as its strength: bit for bit
    sched, _ = webui.txt2img("a cat <lora:sl_lora:0@0.5:1>")
    full, _ = webui.txt2img("a cat <lora:sl_lora:1>")
    assert not same(sched, none1) and not same(sched, full)
    none2, _ = webui.txt2img("a cat")
    assert same(none1, none2)
