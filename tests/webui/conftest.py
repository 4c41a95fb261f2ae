"""Integration tests against a real AUTOMATIC1111 WebUI (v1.10.1), through its API.

Run:  WEBUI_PATH=/path/to/stable-diffusion-webui python -m pytest tests/webui -v
      (starts the server on 127.0.0.1 with this extension linked into extensions/, stops it after)
or:   WEBUI_URL=http://127.0.0.1:7861 WEBUI_PATH=... python -m pytest tests/webui
      (reuses a running server that already has the extension; WEBUI_PATH is still needed to
      write the test networks into models/Lora).
Optional: WEBUI_PYTHON (the WebUI's interpreter, default this one), WEBUI_ARGS (extra flags),
WEBUI_CKPT (checkpoint the networks are built for; default: the loaded model's file),
WEBUI_FAMILY_CKPTS (SD 2.x / SDXL checkpoints to also test on, see test_families.py).
Without WEBUI_PATH every test here is skipped with that reason.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from .server import make_test_networks, running_webui


class WebUI:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def request(self, method: str, path: str, payload=None, timeout: float = 900):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            body = error.read()
            try:
                return error.code, json.loads(body)
            except ValueError:
                return error.code, body.decode(errors="replace")

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, payload, **kw):
        return self.request("POST", path, payload, **kw)

    def stopped_midway(self, route: str, **payload) -> tuple:
        """Start a long scheduled generation, call ``route`` (interrupt or skip) while it samples,
        and return the generation's (status, body)."""
        result = {}
        payload = dict(prompt="a cat <lora:sl_lora:0@0,1@1>", width=64, height=64, seed=1, save_images=False, **payload)
        thread = threading.Thread(target=lambda: result.setdefault("r", self.post("/sdapi/v1/txt2img", payload)))
        thread.start()
        time.sleep(3)
        self.post(route, {})
        thread.join(600)
        return result["r"]

    # Small, fast defaults: the smallest image the WebUI makes, few steps, nothing saved.
    DEFAULTS = dict(
        negative_prompt="", seed=1234, steps=6, width=64, height=64, cfg_scale=5, sampler_name="Euler",
        batch_size=1, n_iter=1, save_images=False, send_images=True,
    )

    def _generate(self, route: str, payload: dict):
        status, body = self.post(route, {**self.DEFAULTS, **payload})
        assert status == 200, body
        return [decode(img) for img in body["images"]], body

    def txt2img(self, prompt: str, **kw):
        return self._generate("/sdapi/v1/txt2img", dict(prompt=prompt, **kw))

    def img2img(self, prompt: str, init, **kw):
        """img2img from an RGB array ``init`` (seed 7, 8 steps, denoising 0.6 unless given)."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(init).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        payload = dict(seed=7, steps=8, denoising_strength=0.6, **kw)
        return self._generate("/sdapi/v1/img2img", dict(prompt=prompt, init_images=[image], **payload))

    def txt2img_error(self, prompt: str, **kw):
        payload = dict(prompt=prompt, seed=1, steps=2, width=64, height=64, save_images=False)
        payload.update(kw)
        return self.post("/sdapi/v1/txt2img", payload)


def decode(b64: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB"))


@pytest.fixture(scope="session")
def webui():
    with running_webui(ui=False, need_path=True) as url:
        client = WebUI(url)
        make_test_networks(lambda path: client.get(path)[1], lambda path: client.post(path, {}))
        yield client
