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
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTENSION = "sd-webui-scheduled-lora"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _wait(url: str, proc, timeout: float) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"WebUI exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/sdapi/v1/sd-models", timeout=5):
                return
        except Exception:
            time.sleep(2)
    raise TimeoutError(f"WebUI did not answer at {url} within {timeout}s")


@pytest.fixture(scope="session")
def webui():
    path = os.environ.get("WEBUI_PATH")
    if not path:
        pytest.skip(
            "set WEBUI_PATH to an AUTOMATIC1111 stable-diffusion-webui checkout to run the integration tests"
        )
    webui_path = Path(path)
    link = webui_path / "extensions" / EXTENSION
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    proc = None
    url = os.environ.get("WEBUI_URL")
    if not url:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        python = os.environ.get("WEBUI_PYTHON", sys.executable)
        args = [
            python,
            "launch.py",
            "--skip-prepare-environment",
            "--skip-install",
            "--skip-torch-cuda-test",
            "--skip-version-check",
            "--nowebui",
            "--api",
            "--server-name",
            "127.0.0.1",
            "--port",
            str(port),
            *shlex.split(os.environ.get("WEBUI_ARGS", "")),
        ]
        log = open(webui_path / "scheduled_lora_tests.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            args, cwd=webui_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait(url, proc, float(os.environ.get("WEBUI_START_TIMEOUT", 600)))
        client = WebUI(url)
        _, models = client.get("/sdapi/v1/sd-models")
        _, options = client.get("/sdapi/v1/options")
        ckpt = os.environ.get("WEBUI_CKPT")
        if not ckpt:
            wanted = options.get("sd_model_checkpoint", "")
            ckpt = next(
                (m["filename"] for m in models if m["title"] == wanted or m["model_name"] in wanted),
                models[0]["filename"],
            )
        from lib_scheduled_lora.host.fixtures import make_networks

        make_networks(ckpt, webui_path / "models" / "Lora")
        client.post("/sdapi/v1/refresh-loras", {})
        yield client
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
