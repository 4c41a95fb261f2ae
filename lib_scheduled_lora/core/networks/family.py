"""The one base-model guesser: which model family a network was made for, and why.

Evidence, strongest first:

1. layer widths: the cross-attention context width (768 SD 1.x, 1024 SD 2.x, 2048 SDXL) and the
   first text encoder's width (768 / 1024);
2. layer names: only unambiguous signs count, since the middle levels of the UNet look alike in
   every family (SDXL: two text encoders ``lora_te1_``/``lora_te2_``, no attention in the first
   level, transformer depth > 1, the label embedding; SD 1.x/2.x: attention in the first level,
   a fourth level, ``lora_te_``); signs of both say nothing (SD 1.x files that spell their text
   encoder ``lora_te1_``, as the WebUI allows);
3. metadata written by trainers (``ss_base_model_version``, ``modelspec.architecture``, ...).

Names cannot tell SD 1.x from 2.x; that answer is ``"sd"`` unless widths or metadata say which.
``inspect`` prints the guess with its reasons; the name mapping refuses a network whose family
contradicts the model's (an SDXL network on SD 1.x), before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lib_scheduled_lora.core.networks.base import NetworkModule
from lib_scheduled_lora.core.networks.modules import BaseModule

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
SD = "sd"  # SD 1.x or 2.x, not told apart
UNKNOWN = "unknown"
LABELS = {
    "sd1": "SD 1.x", "sd2": "SD 2.x", SD: "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD 3", "flux": "FLUX",
    UNKNOWN: "unknown",
}


@dataclass(frozen=True)
class FamilyGuess:
    """``family``: one of :data:`FAMILIES`, ``"sd"`` (1.x or 2.x) or ``"unknown"``."""

    family: str
    reasons: tuple[str, ...]

    @property
    def label(self) -> str:
        return LABELS.get(self.family, self.family)

    def contradicts(self, model_family: str) -> bool:
        """True when the network cannot be for a model of ``model_family`` ("sd1"/"sd2"/"sdxl")."""
        if self.family == UNKNOWN or model_family not in ("sd1", "sd2", "sdxl"):
            return False
        if self.family == SD:
            return model_family == "sdxl"
        return (self.family == "sdxl") != (model_family == "sdxl")


def _agrees(a: str, b: str) -> bool:
    return a == b or {a, b} in ({SD, "sd1"}, {SD, "sd2"})


# -- evidence ------------------------------------------------------------------------------------

_CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_WIDTHS = {768: "sd1", 1024: "sd2"}
_SDXL_SIGNS = re.compile(r"^(lora_te1_|lora_te2_)|_(transformer_blocks_[1-9]|label_emb_|add_embedding_)")
_SD_SIGNS = re.compile(
    r"^lora_te_|^(lora_unet_|lycoris_)(down_blocks_0_attentions|down_blocks_3_|up_blocks_3_|"
    r"input_blocks_[12]_1_|output_blocks_(9|10|11)_)"
)


def _from_widths(modules: Mapping[str, NetworkModule]) -> list[tuple[str, str]]:
    votes: list[tuple[str, str]] = []
    context = {
        m.in_features
        for k, m in modules.items()
        if re.search(r"attn2_to_[kv]$", k) and isinstance(m, BaseModule) and m.in_features is not None
    }
    votes += [(_CONTEXT_DIMS[d], f"cross-attention context dim {d}") for d in sorted(context) if d in _CONTEXT_DIMS]
    te_width = {
        m.in_features
        for k, m in modules.items()
        if k.startswith("lora_te_") and k.endswith("_self_attn_q_proj") and isinstance(m, BaseModule) and m.in_features
    }
    votes += [(_TE_WIDTHS[d], f"text encoder width {d}") for d in sorted(te_width) if d in _TE_WIDTHS]
    return votes


def _from_names(keys: list[str]) -> list[tuple[str, str]]:
    sdxl = next((k for k in keys if _SDXL_SIGNS.search(k)), None)
    sd = next((k for k in keys if _SD_SIGNS.search(k)), None)
    if (sdxl is None) == (sd is None):
        return []  # no sign, or signs of both: names do not tell
    if sdxl is not None and sdxl.startswith(("lora_te1_", "lora_te2_")):
        return [("sdxl", "two text encoders (lora_te1_ / lora_te2_ keys)")]
    if sdxl is not None:
        return [("sdxl", f"layer names of SDXL's UNet ({sdxl})")]
    return [(SD, f"layer names of SD 1.x/2.x ({sd})")]


def _from_metadata(metadata: Mapping[str, str]) -> list[tuple[str, str]]:
    votes: list[tuple[str, str]] = []
    version = metadata.get("ss_base_model_version", "").lower()
    for start, family in (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("sd3", "sd3"), ("flux", "flux")):
        if version.startswith(start):
            votes.append((family, f"metadata ss_base_model_version={version!r}"))
            break
    arch = metadata.get("modelspec.architecture", "").lower()
    for start, family in (
        ("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v1", "sd1"), ("stable-diffusion-v2", "sd2"),
        ("stable-diffusion-3", "sd3"), ("flux", "flux"),
    ):
        if arch.startswith(start):
            votes.append((family, f"metadata modelspec.architecture={arch!r}"))
            break
    if metadata.get("ss_v2") == "True":
        votes.append(("sd2", "metadata ss_v2=True"))
    model_name = metadata.get("ss_sd_model_name", "").lower()
    for needle, family in (("xl", "sdxl"), ("v1-5", "sd1"), ("v1-4", "sd1"), ("sd15", "sd1"), ("v2-1", "sd2"), ("768-v", "sd2")):
        if model_name and needle in model_name:
            votes.append((family, f"metadata ss_sd_model_name={model_name!r}"))
            break
    return votes


def guess_family(modules: Mapping[str, NetworkModule], metadata: Mapping[str, str] | None = None) -> FamilyGuess:
    """The family with the strongest evidence (widths, then names, then metadata); a names-only
    ``"sd"`` is made precise by metadata that says 1.x or 2.x. Disagreeing evidence is listed as
    ``but ... suggests ...``."""
    tiers = [_from_widths(modules), _from_names(list(modules)), _from_metadata(metadata or {})]
    votes = [vote for tier in tiers for vote in tier]
    if not votes:
        return FamilyGuess(UNKNOWN, ("no base-model metadata and no telling layer names or widths",))
    family = next(tier for tier in tiers if tier)[0][0]
    if family == SD:
        family = next((f for f, _ in votes if f in ("sd1", "sd2")), SD)
    reasons = [reason for f, reason in votes if _agrees(f, family)]
    reasons += [f"but {reason} suggests {LABELS.get(f, f)}" for f, reason in votes if not _agrees(f, family)]
    return FamilyGuess(family, tuple(reasons))
