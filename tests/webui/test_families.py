"""SD 2.x and SDXL in the real WebUI: our engine applies what the host's own Lora applies.

Needs checkpoints of those families in the WebUI: name them (titles or file names, comma
separated) in ``WEBUI_FAMILY_CKPTS``, e.g. ``tiny-sd2.safetensors,tiny-sdxl.safetensors``.
The test switches the WebUI to each in turn (and back), and writes LoRA/LoCon networks with
text-encoder layers for it into models/Lora.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from .server import current_kind

pytestmark = pytest.mark.skipif(current_kind() == "sdnext", reason="AUTOMATIC1111's checkpoints; SD.Next: test_sdnext.py")

CKPTS = [c.strip() for c in os.environ.get("WEBUI_FAMILY_CKPTS", "").split(",") if c.strip()]


def _diff(a, b) -> tuple[float, int]:
    d = np.abs(a[0].astype(int) - b[0].astype(int))
    return float(d.mean()), int(d.max())


@pytest.fixture(scope="module", params=CKPTS or [None], ids=lambda c: c or "none")
def family(request, webui):
    wanted = request.param
    if wanted is None:
        pytest.skip("set WEBUI_FAMILY_CKPTS to SD 2.x / SDXL checkpoints the WebUI has (comma separated)")
    _, models = webui.get("/sdapi/v1/sd-models")
    model = next((m for m in models if wanted in (m["title"], m["model_name"], Path(m["filename"]).name)), None)
    assert model is not None, f"the WebUI has no checkpoint {wanted!r}"
    _, options = webui.get("/sdapi/v1/options")
    previous = options["sd_model_checkpoint"]
    status, body = webui.post("/sdapi/v1/options", {"sd_model_checkpoint": model["title"]})
    assert status == 200, body
    from support.webui_networks import make_networks

    prefix = "sl_" + Path(model["filename"]).stem.replace("-", "_")
    make_networks(model["filename"], Path(os.environ["WEBUI_PATH"]) / "models" / "Lora", text_encoder=True, prefix=prefix)
    webui.post("/sdapi/v1/refresh-loras", {})
    try:
        yield prefix
    finally:
        webui.post("/sdapi/v1/options", {"sd_model_checkpoint": previous})


@pytest.mark.parametrize("kind", ["lora", "locon", "loha"])
def test_engine_matches_the_builtin(webui, family, kind):
    """``hr=`` makes a tag ours without a hires pass: the first pass is then a constant strength
    applied by our engine (UNet and text encoders), the host's plain tag by its own Lora."""
    name = f"{family}_{kind}"
    none, _ = webui.txt2img("a cat")
    host, body = webui.txt2img(f"a cat <lora:{name}:0.8>")
    ours, _ = webui.txt2img(f"a cat <lora:{name}:0.8:hr=0.3>")
    assert name in body["info"]  # the host's "Lora hashes": it found the network
    assert _diff(host, none)[0] > 1.0
    mean, peak = _diff(ours, host)
    assert mean < 0.01 and peak <= 2, (mean, peak)  # float rounding only (measured: mean <= 0.0002, peak 1)


def test_schedule_and_restore(webui, family):
    name = f"{family}_lora"
    none1, _ = webui.txt2img("a cat")
    full, _ = webui.txt2img(f"a cat <lora:{name}:1>")
    ramp, _ = webui.txt2img(f"a cat <lora:{name}:0@0,1@1>")
    const, _ = webui.txt2img(f"a cat <lora:{name}:1@0,1@1>")
    assert _diff(ramp, none1)[0] > 0.05 and _diff(ramp, full)[0] > 0.05  # in between: not either end
    assert np.array_equal(const[0], full[0])
    none2, _ = webui.txt2img("a cat")
    assert np.array_equal(none1[0], none2[0])


def test_te_schedule_per_prompt_editing_segment(webui, family):
    """``[red:blue:0.5]`` is encoded in two segments, each at the te strength of its first step.
    ``te=1@0.5:0`` encodes "red" with the LoRA's text-encoder part and "blue" without it: far from
    all-off, and close to, but not exactly, all-on (the late segment matters little on a tiny
    model); ``te=0@0.5:1`` the other way round. Without prompt editing only step 0 counts."""
    name = f"{family}_lora"
    edit = "a cat [red:blue:0.5]"
    unet_off = "unet=0@0,0@1"  # ours, with the UNet part off: only the text encoders differ
    off, _ = webui.txt2img(f"{edit} <lora:{name}:0:0>", steps=8)
    on, _ = webui.txt2img(f"{edit} <lora:{name}:1:0>", steps=8)
    down, _ = webui.txt2img(f"{edit} <lora:{name}:te=1@0.5:0:{unet_off}>", steps=8)
    up, _ = webui.txt2img(f"{edit} <lora:{name}:te=0@0.5:1:{unet_off}>", steps=8)
    assert _diff(down, off)[0] > 1.0 and _diff(up, on)[0] > 1.0
    assert not np.array_equal(down[0], on[0]) and not np.array_equal(up[0], off[0])
    plain_off, _ = webui.txt2img(f"a cat red <lora:{name}:0:0>", steps=8)
    first_only, _ = webui.txt2img(f"a cat red <lora:{name}:te=0@0.5:1:{unet_off}>", steps=8)
    assert np.array_equal(plain_off[0], first_only[0])
