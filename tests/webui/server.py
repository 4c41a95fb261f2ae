"""A real WebUI for the integration tests (tests/webui) and the browser tests
(tests/test_editor_browser.py): reuse ``WEBUI_URL``, or start ``WEBUI_PATH``'s ``launch.py`` on
127.0.0.1 with this extension linked into its extensions/, and stop it afterwards.

The kind of WebUI is read from the checkout (:func:`host_kind`), never configured: AUTOMATIC1111,
Forge main, Forge Neo or SD.Next; tests meant for another kind skip with the reason.

Environment: WEBUI_PATH, WEBUI_URL, WEBUI_PYTHON (the WebUI's interpreter, default this one),
WEBUI_ARGS (extra flags, e.g. ``--always-cpu`` for Forge main or ``--cpu`` for Neo on a machine
without a GPU), WEBUI_START_TIMEOUT (seconds, default 600). SD.Next offline also wants
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


A1111, FORGE, NEO, SDNEXT = "a1111", "forge", "neo", "sdnext"
KIND_NAMES = {A1111: "AUTOMATIC1111", FORGE: "Forge main", NEO: "Forge Neo", SDNEXT: "SD.Next"}


def host_kind(path: str | os.PathLike | None = None) -> str | None:
    """The kind of WebUI checkout at ``path`` (default ``WEBUI_PATH``; None without one), from its
    files: SD.Next has ``installer.py`` at the top and a ``modules/lora`` package; Forge has ``modules_forge/``, and Neo's patcher
    (ComfyUI's) keeps a ``patches_uuid`` where Forge main's has a LoraLoader."""
    path = path or os.environ.get("WEBUI_PATH")
    if not path:
        return None
    root = Path(path)
    if (root / "installer.py").is_file() and (root / "modules" / "lora").is_dir():
        return SDNEXT
    if (root / "modules_forge").is_dir():
        base = root / "backend" / "patcher" / "base.py"
        return NEO if base.is_file() and "patches_uuid" in base.read_text(errors="replace") else FORGE
    return A1111


def require_kind(*kinds: str) -> None:
    """Skip the calling test unless the WebUI under test is one of ``kinds``."""
    kind = host_kind()
    if kind not in kinds:
        wanted = " or ".join(KIND_NAMES[k] for k in kinds)
        pytest.skip(f"for {wanted}; WEBUI_PATH is {KIND_NAMES.get(kind or '', 'not set')}")


# Flags every start needs on each kind (on top of the API/port ones): Forge checks the Python
# version and main downloads a default checkpoint unless told not to.
KIND_FLAGS = {
    A1111: [],
    FORGE: ["--skip-python-version-check", "--no-download-sd-model"],
    NEO: ["--skip-python-version-check"],
    SDNEXT: [],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def current_kind() -> str:
    """The kind of WebUI under test (:func:`host_kind`); AUTOMATIC1111 without WEBUI_PATH."""
    return host_kind() or A1111


def _launch_args(kind: str, ui: bool, port: int) -> list[str]:
    if kind == SDNEXT:
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
        *KIND_FLAGS[kind],
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
        pytest.skip(
            "set WEBUI_PATH to a WebUI checkout (AUTOMATIC1111, Forge main, Forge Neo or SD.Next; "
            "WEBUI_URL to reuse a running one)"
        )
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
            *_launch_args(current_kind(), ui, port),
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
