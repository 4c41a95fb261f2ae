"""Scheduled LoRA: change the strength of LoRA-family networks at every sampling step.

Host-independent core (torch + safetensors + numpy). WebUI adapters live in ``scripts/``.
"""

__version__ = "0.1.0"
