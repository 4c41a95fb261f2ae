"""Scheduled LoRA in a real SD.Next (diffusers backend), through its API.

Run:  WEBUI_PATH=/path/to/sdnext WEBUI_PYTHON=/path/to/sdnext/venv/bin/python \\
          WEBUI_ARGS="--config /path/to/config.json" HF_HUB_OFFLINE=1 python -m pytest tests/webui
or reuse a running one: WEBUI_URL=http://127.0.0.1:7870 WEBUI_PATH=... python -m pytest tests/webui
The config should have ``server_rate_limit: 0`` (SD.Next answers HTTP 429 past 300 requests a
minute per path). WEBUI_FAMILY_CKPTS=Diffusers/tiny-sdxl adds the SDXL checks.

SD.Next's own LoRA code has two bugs in its default "fuse" mode (measured at 058a7f0c, see the
README): a changed strength of a cached LoRA is ignored, and a LoRA loaded with another
``lora_apply_te`` stays baked in. Comparisons with its plain tags therefore run in its backup
mode (``lora_fuse_native: false``); one test runs the fuse mode beside a scheduled tag.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lib_scheduled_lora.hosts import xyz

from .server import current_kind

pytestmark = pytest.mark.skipif(current_kind() != "sdnext", reason="WEBUI_PATH is not an SD.Next checkout")

HIRES = dict(
    enable_hr=True, hr_scale=1.5, hr_upscaler="Latent Nearest", hr_resize_mode=1, hr_second_pass_steps=3,
    denoising_strength=0.5,
)
TE = dict(lora_apply_te=True)
FAMILIES = [c.strip() for c in os.environ.get("WEBUI_FAMILY_CKPTS", "").split(",") if c.strip()]


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def mean_peak(a, b) -> tuple[float, int]:
    d = np.abs(a[0].astype(int) - b[0].astype(int))
    return float(d.mean()), int(d.max())


def close(a, b) -> bool:
    """Our engine and SD.Next's own LoRA on the same strengths: float rounding apart at most
    (measured: identical on a fresh server; after SD.Next's fuse mode has left its ~1e-8 unfuse
    residue in the weights, which its backup mode's older copies do not have, mean 0.018, peak 2)."""
    mean, peak = mean_peak(a, b)
    return mean < 0.05 and peak <= 2


def infotext(body) -> str:
    import json

    info = json.loads(body["info"]) if isinstance(body["info"], str) else body["info"]
    return " ".join(info.get("infotexts") or [str(info)])


def _set_options(webui, values: dict) -> dict:
    """Set SD.Next options; returns what to set to undo it. SD.Next's GET /options lists only the
    options that were set: the others' defaults come from /options-info."""
    _, options = webui.get("/sdapi/v1/options")
    missing = [k for k in values if k not in options]
    if missing:
        _, info = webui.get("/sdapi/v1/options-info")
        options = {**options, **{k: info["options"][k]["default"] for k in missing}}
    previous = {k: options[k] for k in values}
    status, body = webui.post("/sdapi/v1/options", values)
    assert status == 200, body
    return previous


@pytest.fixture(scope="module")
def sdnext(webui):
    """The session's SD.Next, in LoRA backup mode, with ``slte_lora`` (UNet and text encoder)."""
    from support.webui_networks import make_networks

    _, options = webui.get("/sdapi/v1/options")
    _, models = webui.get("/sdapi/v1/sd-models")
    loaded = next(m for m in models if m["title"] == options["sd_model_checkpoint"])
    make_networks(Path(os.environ["WEBUI_PATH"]) / loaded["filename"], Path(os.environ["WEBUI_PATH"]) / "models" / "Lora",
                  text_encoder=True, prefix="slte")
    webui.post("/sdapi/v1/refresh-loras", {})
    webui.txt2img("a cat")  # nothing of the host's loaded before its mode changes
    previous = _set_options(webui, {"lora_fuse_native": False})
    try:
        yield webui
    finally:
        webui.txt2img("a cat")
        _set_options(webui, previous)


def test_extension_is_loaded_with_its_xyz_axes(sdnext):
    status, info = sdnext.get("/scheduled-lora/v1/info")
    assert status == 200, info
    assert set(info["xyz_axes"]["txt2img"]) == set(xyz.AXES)


def test_constant_schedule_equals_plain_tag(sdnext):
    plain, _ = sdnext.txt2img("a cat <lora:sl_lora:0.8>")
    constant, _ = sdnext.txt2img("a cat <lora:sl_lora:0.8@0,0.8@1>")
    assert same(plain, constant)


def test_step_schedule_differs_from_none_and_full_and_restores(sdnext):
    none1, _ = sdnext.txt2img("a cat")
    full, _ = sdnext.txt2img("a cat <lora:sl_lora:1>")
    sched, body = sdnext.txt2img("a cat <lora:sl_lora:0@0.3:1>")
    assert not same(sched, none1) and not same(sched, full) and not same(full, none1)
    assert "<lora:sl_lora:0@0.3:1>" in infotext(body)
    none2, _ = sdnext.txt2img("a cat")
    assert same(none1, none2)
    again, _ = sdnext.txt2img("a cat <lora:sl_lora:0@0.3:1>")
    assert same(sched, again)


@pytest.mark.parametrize("name", ["sl_lora", "sl_locon", "sl_loha"])
def test_engine_matches_sdnexts_own_lora(sdnext, name):
    """``hr=`` makes a tag ours without a hires pass: a constant first pass applied by our engine,
    against the same strength applied by SD.Next's native LoRA code."""
    none, _ = sdnext.txt2img("a cat")
    host, _ = sdnext.txt2img(f"a cat <lora:{name}:0.8>")
    ours, _ = sdnext.txt2img(f"a cat <lora:{name}:0.8:hr=0.3>")
    assert mean_peak(host, none)[0] > 1.0
    assert close(ours, host), mean_peak(ours, host)


def test_switched_off_sdnext_evaluates_its_own_way(sdnext):
    """With the switch off the tag goes to SD.Next as written: what a user gets without this
    extension. SD.Next evaluates a '@' schedule once, at step 0: ``1@0,0@1`` is the LoRA at 1
    for every step, ``0@0.3:1`` no LoRA at all."""
    off = {"alwayson_scripts": {"scheduled lora": {"args": [False]}}}
    none, _ = sdnext.txt2img("a cat")
    full, _ = sdnext.txt2img("a cat <lora:sl_lora:1>")
    late, body = sdnext.txt2img("a cat <lora:sl_lora:0@0.3:1>", **off)
    early, _ = sdnext.txt2img("a cat <lora:sl_lora:1@0,0@1>", **off)
    assert same(late, none) and same(early, full)
    assert "Scheduled LoRA: off" in infotext(body)
    ours, _ = sdnext.txt2img("a cat <lora:sl_lora:1@0,0@1>")
    assert not same(ours, full) and not same(ours, none)


def test_bad_tags_are_errors_before_sampling(sdnext):
    for prompt, expected in [
        ("a cat <lora:sl_lora:0@0.3:abc>", "'abc' at column 21 is not a number"),
        ("a cat <lora:no_such_net:0@0.3:1>", "no network named 'no_such_net'"),
        ("a cat <lora:sl_lora:0@0.3:1:in=0.5>", "'in=0.5' at column 23 is an SD.Next per-block strength"),
        ("a cat <lora:sl_lora:1:in=0@0,1@1>", "is a per-block schedule"),
    ]:
        status, body = sdnext.txt2img_error(prompt)
        assert status >= 400 and expected in str(body), (prompt, body)
    plain, _ = sdnext.txt2img("a cat <lora:sl_lora:1:in=0.5:out=1>")  # per-block strengths of a plain tag: SD.Next's
    full, _ = sdnext.txt2img("a cat <lora:sl_lora:1>")
    assert not same(plain, full)


def test_second_order_sampler(sdnext):
    none1, _ = sdnext.txt2img("a cat", sampler_name="Heun")
    plain, _ = sdnext.txt2img("a cat <lora:sl_lora:0.7>", sampler_name="Heun")
    const, _ = sdnext.txt2img("a cat <lora:sl_lora:0.7@0,0.7@1>", sampler_name="Heun")
    sched, _ = sdnext.txt2img("a cat <lora:sl_lora:0@0.5:1>", sampler_name="Heun")
    assert same(plain, const) and not same(sched, plain) and not same(sched, none1)
    none2, _ = sdnext.txt2img("a cat", sampler_name="Heun")
    assert same(none1, none2)


def test_hires_pass(sdnext):
    none1, _ = sdnext.txt2img("a cat", **HIRES)
    a, _ = sdnext.txt2img("a cat <lora:sl_lora:0@0.3:1>", **HIRES)
    b, _ = sdnext.txt2img("a cat <lora:sl_lora:0@0.3:1:hr=0>", **HIRES)
    assert a[0].shape[0] == 96
    assert not same(a, b) and not same(a, none1)
    none2, _ = sdnext.txt2img("a cat", **HIRES)
    assert same(none1, none2)


def test_img2img(sdnext):
    base, _ = sdnext.txt2img("a cat")
    none1, _ = sdnext.img2img("a dog", base[0])
    plain, _ = sdnext.img2img("a dog <lora:sl_lora:0.8>", base[0])
    const, _ = sdnext.img2img("a dog <lora:sl_lora:0.8@0,0.8@1>", base[0])
    sched, body = sdnext.img2img("a dog <lora:sl_lora:0@0.3:1>", base[0])
    assert same(plain, const) and not same(sched, none1) and not same(sched, plain)
    assert "<lora:sl_lora:0@0.3:1>" in infotext(body)
    none2, _ = sdnext.img2img("a dog", base[0])
    assert same(none1, none2)


def test_te_schedule(sdnext):
    """``te`` schedules apply where SD.Next applies LoRAs to the text encoders (``lora_apply_te``),
    at step 0 of the pass, like its own constant ``te=``."""
    none1, _ = sdnext.txt2img("a cat")
    host0, _ = sdnext.txt2img("a cat <lora:slte_lora:te=0:unet=1>", **TE)
    host1, _ = sdnext.txt2img("a cat <lora:slte_lora:te=1:unet=1>", **TE)
    ramp_up, _ = sdnext.txt2img("a cat <lora:slte_lora:te=0@0,1@1:unet=1>", **TE)
    ramp_down, _ = sdnext.txt2img("a cat <lora:slte_lora:te=1@0,0@1:unet=1>", **TE)
    sdnext.txt2img("a cat", **TE)  # SD.Next unloads its LoRA only under the same lora_apply_te
    assert not same(host0, host1)
    assert close(ramp_up, host0) and close(ramp_down, host1)
    without_te, _ = sdnext.txt2img("a cat <lora:slte_lora:te=1@0,0@1:unet=1>")  # lora_apply_te off: UNet only
    assert close(without_te, host0)
    none2, _ = sdnext.txt2img("a cat")
    assert same(none1, none2)


def test_weights_restored_after_interrupt(sdnext):
    none1, _ = sdnext.txt2img("a cat")
    status, _ = sdnext.stopped_midway("/sdapi/v1/interrupt", steps=400)
    assert status == 200
    none2, _ = sdnext.txt2img("a cat")
    assert same(none1, none2)


def test_weights_restored_after_skip(sdnext):
    none1, _ = sdnext.txt2img("a cat")
    status, _ = sdnext.stopped_midway("/sdapi/v1/skip", steps=300, n_iter=2)
    assert status == 200
    none2, _ = sdnext.txt2img("a cat")
    assert same(none1, none2)


def test_batch_size_and_count(sdnext):
    single, _ = sdnext.txt2img("a cat")
    images, _ = sdnext.txt2img("a cat <lora:sl_lora:0@0.3:1>", batch_size=2, n_iter=2)
    cells = images[-4:]
    assert len(cells) == 4 and len({c.tobytes() for c in cells}) == 4
    again, _ = sdnext.txt2img("a cat")
    assert same(single, again)


def test_xyz_grid_with_our_axes(sdnext):
    """SD.Next's "XYZ Grid Script", axes named by label (its API takes labels or indices)."""
    args = [
        "Scheduled LoRA: switch point", "0.2, 0.8", [],
        "Scheduled LoRA: strength", "0.5, 1", [],
        "Nothing", "", [],
        False, True, False,  # csv mode, legend, no fixed seeds
        True, False, True,  # grid, subgrids, images
        False, False, 0,  # time, text, margin
        False, "None", 2.0, True, True, False,  # no video
    ]
    images, body = sdnext.txt2img("a cat <lora:sl_lora:0@0.3:1>", script_name="xyz grid script", script_args=args, steps=4)
    assert len(images) == 5  # the grid and four cells
    cells = images[1:]
    direct, _ = sdnext.txt2img("a cat <lora:sl_lora:0@0.2:0.5>", steps=4)
    assert same(cells[:1], direct) and not same(cells[:1], cells[1:2])
    text = infotext(body)
    for tag in ("0@0.2:0.5", "0@0.8:0.5", "0@0.2:1", "0@0.8:1"):
        assert f"<lora:sl_lora:{tag}>" in text


def test_plot_setting_appends_the_multiplier_plot(sdnext):
    images, _ = sdnext.txt2img("a cat <lora:sl_lora:0@0.3:1>", override_settings={"scheduled_lora_plot": True})
    assert len(images) == 2 and images[1].shape[0] > 100


@pytest.fixture(params=FAMILIES or [None], ids=lambda c: c or "none")
def family(request, sdnext):
    """Another model SD.Next has (``WEBUI_FAMILY_CKPTS``, e.g. Diffusers/tiny-sdxl), loaded for the
    test and switched back after, with LoRA/LoCon networks (UNet and text encoders) for it."""
    wanted = request.param
    if wanted is None:
        pytest.skip("set WEBUI_FAMILY_CKPTS to SD.Next model titles (e.g. Diffusers/tiny-sdxl)")
    from support.webui_networks import make_networks

    _, models = sdnext.get("/sdapi/v1/sd-models")
    model = next((m for m in models if wanted in (m["title"], m["model_name"])), None)
    assert model is not None, f"SD.Next has no model {wanted!r}"
    root = Path(os.environ["WEBUI_PATH"])
    prefix = "sl_" + Path(model["filename"]).name.replace("-", "_")
    make_networks(root / model["filename"], root / "models" / "Lora", text_encoder=True, prefix=prefix)
    sdnext.post("/sdapi/v1/refresh-loras", {})
    previous = _set_options(sdnext, {"sd_model_checkpoint": model["title"]})
    try:
        yield prefix
    finally:
        sdnext.txt2img("a cat")
        _set_options(sdnext, previous)


def test_family_engine_schedule_te_and_restore(sdnext, family):
    name = f"{family}_lora"
    none1, _ = sdnext.txt2img("a cat")
    for kind in ("lora", "locon"):
        host, _ = sdnext.txt2img(f"a cat <lora:{family}_{kind}:0.8>", **TE)
        ours, _ = sdnext.txt2img(f"a cat <lora:{family}_{kind}:0.8:hr=0.3>", **TE)
        assert mean_peak(host, none1)[0] > 1.0 and close(ours, host), (kind, mean_peak(ours, host))
    full, _ = sdnext.txt2img(f"a cat <lora:{name}:1>", **TE)
    ramp, _ = sdnext.txt2img(f"a cat <lora:{name}:0@0,1@1>", **TE)
    host0, _ = sdnext.txt2img(f"a cat <lora:{name}:te=0:unet=1>", **TE)
    te_up, _ = sdnext.txt2img(f"a cat <lora:{name}:te=0@0,1@1:unet=1>", **TE)
    sdnext.txt2img("a cat", **TE)
    assert not same(ramp, full) and not same(ramp, none1) and close(te_up, host0)
    none2, _ = sdnext.txt2img("a cat")
    assert same(none1, none2)


def test_sdnexts_plain_lora_in_fuse_mode_is_given_back_as_found(sdnext):
    """In SD.Next's default fuse mode its plain LoRA is baked into the weights we copy: a
    scheduled tag beside it leaves exactly those weights, so the next plain image is unchanged,
    and the next image without LoRA is SD.Next's own (its unfuse drift is below a pixel here).
    Last in the module: that drift stays in the served weights."""
    none1, _ = sdnext.txt2img("a cat")
    previous = _set_options(sdnext, {"lora_fuse_native": True})
    try:
        plain1, _ = sdnext.txt2img("a cat <lora:sl_lora:0.5>")
        mixed, _ = sdnext.txt2img("a cat <lora:sl_lora:0.5> <lora:sl_locon:0@0.3:1>")
        plain2, _ = sdnext.txt2img("a cat <lora:sl_lora:0.5>")
        none2, _ = sdnext.txt2img("a cat")
    finally:
        _set_options(sdnext, previous)
    assert not same(mixed, plain1)
    assert same(plain1, plain2), mean_peak(plain1, plain2)
    assert same(none1, none2), mean_peak(none1, none2)
