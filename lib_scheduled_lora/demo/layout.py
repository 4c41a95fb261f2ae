"""Where the built-in demo model and its networks live, and what a demo model folder holds.

Standard library only, so that the command line can check paths and names before it imports
torch and diffusers (:mod:`lib_scheduled_lora.demo.model` loads the model).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"
NETWORKS_DIR = PACKAGE_DIR / "networks"
IMAGE_SIZE = 32  # the only size the model draws, width and height (world.SIZE)
# The model's weight files per component (diffusers' component names), relative to its folder:
# what `merge demo` rewrites; a merged copy keeps this layout and loads like the original.
WEIGHT_FILES = {"unet": ("unet.safetensors",), "text_encoder": ("text_encoder.safetensors",)}
OTHER_FILES = ("config.json", "tokenizer.json")


def is_demo_folder(directory: str | Path) -> bool:
    """True for the shipped weights folder and merged copies of it (``merge demo ...``)."""
    directory = Path(directory)
    names = [*OTHER_FILES, *(n for files in WEIGHT_FILES.values() for n in files)]
    return directory.is_dir() and all((directory / name).is_file() for name in names)


def network_path(name: str) -> Path:
    """Shipped concept network file by tag name (``wday`` = the LoRA, ``wday_locon``, ``wday_loha``)."""
    return NETWORKS_DIR / f"{name}.safetensors"
