"""Loading a network file into modules keyed by kohya base name, plus helpers for ``inspect``.

Two key styles are read:

* kohya / LyCORIS: ``<base>.<suffix>``, base such as ``lora_unet_down_blocks_0_attentions_0_proj_in``
  or ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (``lycoris_<path>`` is the UNet);
* diffusers / PEFT: ``unet.<dotted.path>.lora_A.weight`` / ``lora_B.weight`` (and the older
  ``.lora.down.weight``, ``.lora_linear_layer.down.weight``, ``.processor.to_q_lora.down.weight``
  styles), ``text_encoder.``, ``text_encoder_2.``. Module names become kohya base names the way
  diffusers' own converter (loaders/lora_conversion_utils.py) reads them back: ``lora_unet_`` /
  ``lora_te_`` (``lora_te1_`` + ``lora_te2_`` when both text encoders are present) + the dotted path
  with '.' -> '_'. Alpha comes from ``.alpha`` keys or the ``lora_adapter_metadata`` PEFT config that
  diffusers writes; without either, alpha = rank (scale 1), as diffusers does.

Every key that does not end up in a module is listed in ``Network.unrecognised_keys``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_scheduled_lora.core.networks.base import Network, NetworkModule
from lib_scheduled_lora.core.networks.files import read_safetensors
from lib_scheduled_lora.core.networks.modules import COMMON_SUFFIXES, build_module
from lib_scheduled_lora.errors import NetworkFileError

# Every suffix a kohya / LyCORIS module key may carry (A1111's module types read these).
KOHYA_SUFFIXES = frozenset(
    {
        "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
        "weight", "on_input", "diff", "diff_b", "w_norm", "b_norm", "wd_for_diff",
        *COMMON_SUFFIXES,
    }
)
KOHYA_PREFIXES = ("lora_", "lycoris_")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' loaders.lora_base constant

# diffusers / PEFT key layouts: (regex, suffix in kohya terms). ``path`` is the module's dotted path.
_PEFT_PATTERNS = [
    (re.compile(r"^(?P<path>.+)\.lora_A(?:\.default)?\.weight$"), "lora_down.weight"),
    (re.compile(r"^(?P<path>.+)\.lora_B(?:\.default)?\.weight$"), "lora_up.weight"),
    (re.compile(r"^(?P<path>.+)\.lora(?:_linear_layer)?\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"^(?P<path>.+)\.lora(?:_linear_layer)?\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"^(?P<path>.+_lora)\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"^(?P<path>.+_lora)\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"^(?P<path>.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$"), "dora_scale"),
    (re.compile(r"^(?P<path>.+)\.alpha$"), "alpha"),
]
_COMPONENTS = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2", "transformer": "transformer"}
_UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding")
_OLD_ATTN_LORA = re.compile(r"(?:^|\.)(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)_lora$")
_TE_OLD_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass
class _Slot:
    """One layer's keys while grouping: suffix -> tensor, and where each came from."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    peft: bool = False
    component: str = ""
    raw_path: str = ""


def _kohya_base(key: str) -> tuple[str, str] | None:
    """(base, suffix) for a kohya / LyCORIS key, else None."""
    base, dot, suffix = key.partition(".")
    if not dot or not base.startswith(KOHYA_PREFIXES) or suffix not in KOHYA_SUFFIXES:
        return None
    if base.startswith("lycoris_"):
        base = "lora_unet_" + base[len("lycoris_"):]
    return base, suffix


def _module_path(path: str, component: str) -> str:
    """A PEFT / diffusers module path with the old attention-processor spellings undone."""
    match = _OLD_ATTN_LORA.search(path)
    if match:
        head = path[: match.start()]
        proj = match.group("proj")
        if component in ("te", "te2") or head.endswith("self_attn"):
            path = f"{head}.{_TE_OLD_PROJ[proj]}"
        else:
            path = f"{head}.{'to_out.0' if proj == 'to_out' else proj}"
    return path.removesuffix(".lora_linear_layer").removesuffix(".lora")


def _peft_base(key: str, has_te2: bool) -> tuple[str, str, str, str] | None:
    """(kohya base, suffix, component, raw module path) for a diffusers / PEFT key, else None."""
    head, _, rest = key.partition(".")
    component = _COMPONENTS.get(head)
    if component is None:
        rest = key
    rest = rest.removeprefix("base_model.model.")
    matches = ((pattern.match(rest), suffix) for pattern, suffix in _PEFT_PATTERNS)
    match, suffix = next(((m, s) for m, s in matches if m), (None, ""))
    if match is None:
        return None
    raw_path = match.group("path")
    path = _module_path(raw_path, component or "")
    if component is None:
        if path.startswith(_UNET_ROOTS):
            component = "unet"
        elif path.startswith(("text_model.", "encoder.layers.")):
            component = "te"
        else:
            return None
    if component in ("te", "te2") and path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        # transformers 5 CLIPTextModel has no ``text_model.`` level; kohya names always do.
        path = "text_model." + path
    prefix = {
        "unet": "lora_unet_",
        "te": "lora_te1_" if has_te2 else "lora_te_",
        "te2": "lora_te2_",
        "transformer": "lora_transformer_",
    }[component]
    return prefix + path.replace(".", "_"), suffix, component, raw_path


def _peft_config(metadata: Mapping[str, str]) -> dict:
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def _peft_alpha(config: dict, component: str, raw_path: str, rank: int) -> tuple[float | None, float | None]:
    """(alpha, scale override) from the PEFT config diffusers stores, as PEFT computes scaling."""
    component_name = {"unet": "unet", "te": "text_encoder", "te2": "text_encoder_2", "transformer": "transformer"}[component]

    def get(name):
        return config.get(f"{component_name}.{name}", config.get(name))

    alpha = get("lora_alpha")
    for pattern, value in (get("alpha_pattern") or {}).items():
        # peft.utils.other.get_pattern_key: a pattern matches the module name or any dotted suffix.
        try:
            if re.match(rf"(.*\.)?({pattern})$", raw_path):
                alpha = value
                break
        except re.error:
            continue
    if alpha is None:
        return None, None
    alpha = float(alpha)
    if get("use_rslora"):
        return alpha, alpha / math.sqrt(rank)
    return alpha, None


def _non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors that hold NaN or ±inf (one pass over the file's data)."""
    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def load_network(path: str | os.PathLike, name: str | None = None, *, allow_non_finite: bool = False) -> Network:
    """Read a LoRA / LyCORIS / diffusers-PEFT ``.safetensors`` file into a Network.

    Raises NetworkFileError for unreadable files, malformed modules, files without any
    LoRA/LyCORIS key and, unless ``allow_non_finite`` (``inspect``, which reports them), files
    whose modules hold NaN or infinite values (a damaged file or a diverged training run: merged
    or applied, it turns the model's weights and images into NaN).
    """
    source = str(path)
    tensors, metadata = read_safetensors(path)
    non_finite = _non_finite(tensors)
    has_te2 = any(k.startswith("text_encoder_2.") for k in tensors)
    slots: dict[str, _Slot] = {}
    unrecognised: list[str] = []

    for key, tensor in tensors.items():
        parsed = _kohya_base(key)
        peft = None if parsed is not None else _peft_base(key, has_te2)
        if parsed is None and peft is None:
            unrecognised.append(key)
            continue
        if parsed is not None:
            base, suffix = parsed
        else:
            assert peft is not None
            base, suffix = peft[0], peft[1]
        slot = slots.setdefault(base, _Slot())
        if suffix in slot.weights:  # two spellings of the same layer: keep the first, report the other
            unrecognised.append(key)
            continue
        if peft is not None:
            slot.peft, slot.component, slot.raw_path = True, peft[2], peft[3]
        slot.weights[suffix] = tensor
        slot.keys[suffix] = key

    config = _peft_config(metadata)
    modules: dict[str, NetworkModule] = {}
    for base, slot in slots.items():
        weights = slot.weights
        if slot.peft:
            weights = dict(weights)
            down = weights.get("lora_down.weight")
            if "alpha" not in weights and down is not None:
                alpha, scale = _peft_alpha(config, slot.component, slot.raw_path, down.shape[0])
                if alpha is not None:
                    weights["alpha"] = torch.tensor(alpha)
                if scale is not None:
                    weights["scale"] = torch.tensor(scale)
        # PEFT always stores DoRA magnitudes per output channel ([out], or [1, out, 1, 1] for conv,
        # which the shape rule would read as per-input), so say so instead of guessing.
        module, unused = build_module(base, weights, source, dora_per_output=True if slot.peft else None)
        unrecognised.extend(slot.keys[s] for s in unused if s in slot.keys)
        if module is not None:
            modules[base] = module

    for base, built in modules.items():
        alpha = built.alpha
        if alpha is not None and not math.isfinite(alpha) and not any(k.startswith(base + ".") for k in non_finite):
            non_finite.append(f"{LORA_ADAPTER_METADATA_KEY} (alpha of {base})")  # from the PEFT config
    used = [k for k in non_finite if k not in unrecognised]
    if used and not allow_non_finite:
        raise NetworkFileError(
            source,
            f"{len(used)} tensor(s) hold NaN or infinite values (first: {used[0]}); "
            "the file is damaged or its training diverged",
        )
    if not modules:
        sample = ", ".join(repr(k) for k in list(tensors)[:3])
        raise NetworkFileError(
            source,
            f"no LoRA/LyCORIS keys found among {len(tensors)} tensors"
            + (f" (e.g. {sample})" if sample else "")
            + "; is this a network file?",
        )
    return Network(
        name=name or Path(source).stem,
        path=source,
        modules=modules,
        metadata=dict(metadata),
        unrecognised_keys=sorted(unrecognised),
        non_finite_keys=non_finite,
    )
