"""A real AUTOMATIC1111 WebUI for the integration tests (tests/webui) and the browser tests
(tests/test_editor_browser.py): reuse ``WEBUI_URL``, or start ``WEBUI_PATH``'s ``launch.py`` on
127.0.0.1 with this extension linked into its extensions/, and stop it afterwards.

Environment: WEBUI_PATH, WEBUI_URL, WEBUI_PYTHON (the WebUI's interpreter, default this one),
WEBUI_ARGS (extra flags), WEBUI_START_TIMEOUT (seconds, default 600).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTENSION = "sd-webui-scheduled-lora"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
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


@contextlib.contextmanager
def running_webui(*, ui: bool, need_path: bool) -> Iterator[str]:
    """The URL of a WebUI with the API on (and the Gradio UI when ``ui``). Skips the caller when
    neither WEBUI_URL nor WEBUI_PATH is set, or without WEBUI_PATH when ``need_path``."""
    path, url = os.environ.get("WEBUI_PATH"), os.environ.get("WEBUI_URL")
    if not path and (need_path or not url):
        pytest.skip("set WEBUI_PATH to an AUTOMATIC1111 stable-diffusion-webui checkout (and WEBUI_URL to reuse a running one)")
    if path:
        link = Path(path) / "extensions" / EXTENSION
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
    proc = None
    if not url:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        args = [
            os.environ.get("WEBUI_PYTHON", sys.executable), "launch.py",
            "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
            *([] if ui else ["--nowebui"]),
            "--api", "--server-name", "127.0.0.1", "--port", str(port),
            *shlex.split(os.environ.get("WEBUI_ARGS", "")),
        ]
        log = open(Path(path) / "scheduled_lora_tests.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(args, cwd=path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(url.rstrip("/"), proc, float(os.environ.get("WEBUI_START_TIMEOUT", 600)))
        yield url.rstrip("/")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def make_test_networks(get: Callable[[str], object], post: Callable[[str], object]) -> None:
    """sl_lora / sl_locon / sl_loha for the loaded checkpoint (``WEBUI_CKPT`` overrides) in
    WEBUI_PATH's models/Lora."""
    from support.webui_networks import make_networks_for_webui

    lora_dir = Path(os.environ["WEBUI_PATH"]) / "models" / "Lora"
    make_networks_for_webui(get, post, lora_dir, os.environ.get("WEBUI_CKPT"))
