"""Scheduled LoRA: change the strength of LoRA-family networks at every sampling step.

Layers, each importing only those before it:

* :mod:`lib_scheduled_lora.core` — host-independent (torch + safetensors + numpy): the schedule and
  tag grammar, network files and their maths, name mapping, the per-step weight engine, merging,
  and the interface every host adapter drives (:mod:`lib_scheduled_lora.core.session`);
* :mod:`lib_scheduled_lora.hosts` — one adapter per host: diffusers (the standalone runner and
  library use) and AUTOMATIC1111, plus the policy they share (which tags the host keeps, XYZ
  values, the multiplier plot);
* :mod:`lib_scheduled_lora.demo` — the built-in demo model; :mod:`lib_scheduled_lora.commands` —
  the command line (``python -m lib_scheduled_lora``).

The WebUI loads ``scripts/`` (thin: it imports the host's modules and hands them to
:mod:`lib_scheduled_lora.hosts.a1111`).
"""

__version__ = "0.1.0"
