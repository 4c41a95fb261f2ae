"""Which WebUI loaded the extension: one answer, read once, for the thin ``scripts/`` files.

Read from what each host's own modules look like (verified at the commits in
``../shared/docs/hosts.md``), never from configuration:

* ``"sdnext"``: ``modules.shared.native`` is True (SD.Next's diffusers backend), or its
  top-level ``installer`` module says ``version['app'] == 'sd.next'``;
* ``"forge"``: Forge main and Forge Neo, whose ``modules_forge`` package exists (the two tell
  themselves apart later, by the patcher's features);
* ``"a1111"``: everything else that has ``modules.shared`` (AUTOMATIC1111 v1.10).

Standard library only; importing this module never imports a host module.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Literal

HostKind = Literal["a1111", "forge", "sdnext"]


def host_kind() -> HostKind:
    shared = sys.modules.get("modules.shared")
    if getattr(shared, "native", False) is True:
        return "sdnext"
    installer = sys.modules.get("installer")
    if isinstance(getattr(installer, "version", None), dict) and installer.version.get("app") == "sd.next":  # type: ignore[union-attr]
        return "sdnext"
    if "modules_forge" in sys.modules or _importable("modules_forge"):
        return "forge"
    return "a1111"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
