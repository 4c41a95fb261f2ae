"""Scheduled LoRA for the WebUI that loads this file: the host is detected once
(:mod:`lib_scheduled_lora.hosts.detect`) and its adapter's script module provides the
``scripts.Script`` class and the callbacks. Nothing host-specific lives here."""

from __future__ import annotations

from lib_scheduled_lora.hosts.detect import host_kind

HOST = host_kind()

if HOST == "a1111":
    from lib_scheduled_lora.hosts.a1111_script import *  # noqa: F403 - the host looks for the Script class here
elif HOST == "sdnext":
    from lib_scheduled_lora.hosts.sdnext_script import *  # noqa: F403 - the host looks for the Script class here
elif HOST == "forge":
    from lib_scheduled_lora.hosts.forge_script import *  # noqa: F403 - the host looks for the Script class here
