"""The companion tab's routes in the real WebUI: a baked checkpoint reproduces the host's own LoRA
image, and a sweep grid has the expected cells, labels and infotexts (see conftest.py to run)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest

from .server import SDNEXT, current_kind

# The tab and its routes are registered on AUTOMATIC1111-style hosts (scripts/scheduled_lora_tab.py);
# SD.Next gets neither yet.
pytestmark = pytest.mark.skipif(current_kind() == SDNEXT, reason="the companion tab is not on SD.Next yet")

BAKED = "sl-baked-test"


def _loaded(webui) -> str:
    return webui.get("/sdapi/v1/options")[1]["sd_model_checkpoint"]


@pytest.fixture
def baked_checkpoint(webui):
    folder = Path(os.environ["WEBUI_PATH"]) / "models" / "Stable-diffusion"
    yield folder / f"{BAKED}.safetensors"
    for suffix in (".safetensors", ".yaml"):
        (folder / f"{BAKED}{suffix}").unlink(missing_ok=True)
    webui.post("/sdapi/v1/refresh-checkpoints", {})


def test_baked_checkpoint_reproduces_the_hosts_lora_image(webui, baked_checkpoint):
    model = _loaded(webui)
    status, body = webui.post("/scheduled-lora/v1/merge", {
        "operation": "Bake into checkpoint", "checkpoint": model, "networks": [{"name": "sl_locon", "strength": 0.8}],
        "output": BAKED, "dtype": "keep", "overwrite": True,
    })
    assert status == 200, body
    assert baked_checkpoint.is_file() and "sl_locon at 0.8" in body["report"]
    host, _ = webui.txt2img("a cat <lora:sl_locon:0.8>")
    baked, info = webui.txt2img("a cat", override_settings={"sd_model_checkpoint": BAKED})
    assert BAKED in info["info"]
    none, _ = webui.txt2img("a cat")
    assert _loaded(webui) == model  # the API restored the model afterwards
    difference = np.abs(host[0].astype(int) - baked[0].astype(int))
    assert not np.array_equal(host[0], none[0])  # the network does change the image
    assert difference.max() <= 1, f"max pixel difference {difference.max()}"  # float rounding only
    assert difference.mean() < 0.05


def test_output_names_cannot_leave_the_model_folder(webui):
    status, body = webui.post("/scheduled-lora/v1/merge", {
        "operation": "Merge networks", "networks": [{"name": "sl_lora"}], "output": "../escaped",
    })
    assert status == 422 and "without folders" in body["detail"], body
    assert not (Path(os.environ["WEBUI_PATH"]) / "models" / "escaped.safetensors").exists()


def test_sweep_grid_has_the_cells_labels_and_infotexts(webui):
    status, body = webui.post("/scheduled-lora/v1/sweep", {
        "prompt": "a cat <lora:sl_lora:1>", "x": {"kind": "strength", "values": "0.5, 1"},
        "y": {"kind": "schedule", "values": "0@0.3:1, 1"}, "steps": 6, "width": 64, "height": 64,
        "seed": 1234, "sampler_name": "Euler", "cfg_scale": 5,
    })
    assert status == 200, body
    report = body["report"]
    assert [c["schedule"] for c in report["cells"]] == ["0@0.3:0.5", "0@0.3:1", "0.5", "1"]
    assert report["x"]["labels"] == ["strength x0.5", "strength x1"]
    assert report["y"]["labels"] == ["schedule 0@0.3:1", "schedule 1"]
    for cell in report["cells"]:
        assert cell["infotext"].startswith(cell["prompt"])  # the host's own infotext, per cell
        assert "Seed: 1234" in cell["infotext"] and "Steps: 6" in cell["infotext"]
    full = report["cells"][3]
    assert full["numbers"]["from full strength"] == 0.0 and full["numbers"]["from no network"] > 0
    from PIL import Image

    grid = Image.open(io.BytesIO(base64.b64decode(body["grid"])))
    assert grid.width > 2 * 64 and grid.height > 2 * 64
    assert all(Path(f).is_file() for f in body["files"])
    for f in body["files"]:
        Path(f).unlink()
    # the same cells as ready X/Y/Z plot axes, which the host knows
    axes = webui.get("/scheduled-lora/v1/info")[1]["xyz_axes"]["txt2img"]
    assert [a["axis"] for a in body["xyz"]] == ["Scheduled LoRA: strength", "Scheduled LoRA: schedule"]
    assert all(a["axis"] in axes for a in body["xyz"])


def test_sweep_cells_equal_the_hosts_own_generations(webui):
    """A cell is the host's own txt2img of its prompt with the locked seed, pixel for pixel."""
    status, body = webui.post("/scheduled-lora/v1/sweep", {
        "prompt": "a dog <lora:sl_lora:0@0.5:1>", "x": {"kind": "switch", "values": "0.25, 0.75"}, "steps": 6,
        "width": 64, "height": 64, "seed": 99, "sampler_name": "Euler", "cfg_scale": 5, "numbers": False,
        "images": True,
    })
    assert status == 200, body
    from .conftest import decode

    cells = body["report"]["cells"]
    assert [c["prompt"] for c in cells] == ["a dog <lora:sl_lora:0@0.25:1>", "a dog <lora:sl_lora:0@0.75:1>"]
    for f in body["files"]:
        Path(f).unlink()
    for cell, image in zip(cells, body["images"]):
        direct, _ = webui.txt2img(cell["prompt"], seed=99, steps=6, cfg_scale=5)
        assert np.array_equal(decode(image), direct[0])
    status, body = webui.post("/scheduled-lora/v1/sweep", {"prompt": "a dog", "x": {"kind": "strength", "values": "1"}})
    assert status == 422 and "no network tag" in body["detail"]
