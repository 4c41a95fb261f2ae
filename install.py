"""Run by the WebUI at start (and by "Install from URL"): install only what is missing.

The core needs torch, safetensors and numpy, which every supported WebUI already ships, so this
normally installs nothing. It never installs or upgrades torch, numpy, safetensors or gradio when
they are present (the WebUI owns those builds), and never installs torch at all.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

# import name -> pip requirement. torch is deliberately absent: the host owns its build.
REQUIREMENTS = {"safetensors": "safetensors>=0.4", "numpy": "numpy>=1.24"}
NEVER_INSTALL = ("torch", "gradio")


def _default_is_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _default_run_pip(command: str, desc: str | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *command.split()], check=True)


def missing(is_installed=_default_is_installed) -> list[str]:
    return [req for name, req in REQUIREMENTS.items() if not is_installed(name)]


def main(launch=None) -> list[str]:
    if launch is None:
        try:
            launch = importlib.import_module("launch")  # the WebUI's helper module, when it runs this file
        except ImportError:
            launch = None
    is_installed = getattr(launch, "is_installed", None) or _default_is_installed
    run_pip = getattr(launch, "run_pip", None) or _default_run_pip
    if not is_installed("torch"):
        print(
            "sd-webui-scheduled-lora: torch is missing; install the WebUI's torch first (not installed here)"
        )
    todo = missing(is_installed)
    for requirement in todo:
        run_pip(f"install {requirement}", f"sd-webui-scheduled-lora requirement: {requirement}")
    return todo


if __name__ == "__main__":  # the WebUI runs `python install.py` with its own root on PYTHONPATH
    main()
