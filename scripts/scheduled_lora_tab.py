"""The "Scheduled LoRA" tab (Merge, Sweep) and its API routes for the WebUI that loads this file:
the host's tab module registers them (:mod:`lib_scheduled_lora.hosts.a1111_tab`). Nothing
host-specific lives here."""

from __future__ import annotations

from lib_scheduled_lora.hosts.detect import host_kind

if host_kind() in ("a1111", "forge"):  # Forge main and Neo keep A1111's modules the tab uses
    import lib_scheduled_lora.hosts.a1111_tab  # noqa: F401 - registers the tab and the routes
