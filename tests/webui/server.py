"""A real WebUI for the integration tests (tests/webui) and the browser tests
(tests/test_editor_browser.py): reuse ``WEBUI_URL``, or start ``WEBUI_PATH``'s ``launch.py`` on
127.0.0.1 with this extension linked into its extensions/, and stop it afterwards. The kind of
WebUI (AUTOMATIC1111, SD.Next) is read from the checkout (:func:`webui_kind`).

Environment: WEBUI_PATH, WEBUI_URL, WEBUI_PYTHON (the WebUI's interpreter, default this one),
WEBUI_ARGS (extra flags), WEBUI_START_TIMEOUT (seconds, default 600). SD.Next offline also wants
HF_HUB_OFFLINE=1 in the environment and, for tests, ``server_rate_limit: 0`` in its settings
(``--config FILE`` in WEBUI_ARGS): its API refuses more than 300 requests a minute per path.
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


def webui_kind(path: str | os.PathLike[str] | None) -> str:
    """"sdnext" for an SD.Next checkout (its ``installer.py`` and ``modules/lora`` package), "a1111"
    otherwise (also when no path is given)."""
    if path and (Path(path) / "installer.py").is_file() and (Path(path) / "modules" / "lora").is_dir():
        return "sdnext"
    return "a1111"


def current_kind() -> str:
    return webui_kind(os.environ.get("WEBUI_PATH"))


def _launch_args(kind: str, ui: bool, port: int) -> list[str]:
    if kind == "sdnext":
        # SD.Next always builds its UI and serves the API; --skip-all skips its installer (and
        # the extensions' install.py), --quick the startup checks.
        return [
            "launch.py", "--skip-all", "--skip-git", "--skip-torch", "--skip-env", "--quick",
            "--server-name", "127.0.0.1", "--port", str(port),
        ]
    return [
        "launch.py",
        "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
        *([] if ui else ["--nowebui"]),
        "--api", "--server-name", "127.0.0.1", "--port", str(port),
    ]


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
        pytest.skip("set WEBUI_PATH to an AUTOMATIC1111 or SD.Next checkout (and WEBUI_URL to reuse a running one)")
    if path:
        link = Path(path) / "extensions" / EXTENSION
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
    proc = None
    if not url:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        args = [
            os.environ.get("WEBUI_PYTHON", sys.executable),
            *_launch_args(webui_kind(path), ui, port),
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
    """sl_lora / sl_locon / sl_loha for the loaded checkpoint (``WEBUI_CKPT`` overrides; a
    single file, or SD.Next's diffusers folder) in WEBUI_PATH's models/Lora."""
    from support.webui_networks import make_networks_for_webui

    root = Path(os.environ["WEBUI_PATH"])
    make_networks_for_webui(get, post, root / "models" / "Lora", os.environ.get("WEBUI_CKPT"), root=root)
