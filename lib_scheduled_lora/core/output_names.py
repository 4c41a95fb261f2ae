"""Where a name typed in the WebUI or sent to the API may write: inside its model folder, only.

A name is a plain file name: no folder part (``/``, ``\\``), no ``..``, not hidden (a leading
``.``, which is also how temporary files are named), no control characters, not a Windows device
name. The suffix is added when missing. The result is checked to resolve inside the folder (a
symbolic link already sitting under that name and pointing elsewhere is refused too).
Command-line paths are the user's own and do not go through here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lib_scheduled_lora.errors import OutputNameError

_DEVICE_NAMES = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)
MAX_NAME = 200


def confined_output(folder: str | os.PathLike, name: str, suffix: str = ".safetensors") -> Path:
    """The path ``name`` (+ ``suffix``) denotes inside ``folder``; raises OutputNameError otherwise."""
    text = str(name).strip()
    if not text:
        raise OutputNameError(name, "is empty")
    if any(sep in text for sep in ("/", "\\")) or text in (".", ".."):
        raise OutputNameError(name, "must be a file name, without folders")
    if text.startswith("."):
        raise OutputNameError(name, "may not start with '.'")
    if any(ord(c) < 32 or c in ':*?"<>|' for c in text):
        raise OutputNameError(name, 'may not contain control characters or any of : * ? " < > |')
    if _DEVICE_NAMES.match(text):
        raise OutputNameError(name, "is a reserved device name")
    if not text.lower().endswith(suffix.lower()):
        text += suffix
    if len(text) > MAX_NAME:
        raise OutputNameError(name, f"is longer than {MAX_NAME} characters")
    root = Path(folder).resolve()
    path = root / text
    if not path.resolve().is_relative_to(root) or path.resolve().parent != root:
        raise OutputNameError(name, f"would leave the folder {root}")
    return path
