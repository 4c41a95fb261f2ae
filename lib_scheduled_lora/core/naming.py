"""Where each layer of a network file lands in a model.

Network files name layers the kohya way: a prefix for the component and the module path with
``.`` replaced by ``_`` (``lora_unet_down_blocks_0_attentions_0_proj_in``). Which module path
depends on who trained the file: kohya's SD 1.x/2.x names use the *diffusers* UNet layout, its
SDXL names the *sgm* (ldm) layout. Models come in two layouts as well: a diffusers pipeline
(``unet.down_blocks…``) or the single-file ldm/sgm checkpoint the WebUI runs
(``model.diffusion_model.input_blocks…``).

Rather than a table per (file layout × model layout), every weight of the model is given all the
kohya names that may denote it: its own module path and the same module in the other layout
(both conversions are derived from the block structure), under every prefix the component uses.
Looking a file's keys up in that index is then one dict access per key. The index depends only
on the model's parameter names and shapes, so it is built once per model and cached.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from lib_scheduled_lora.core.networks.base import NetworkModule
from lib_scheduled_lora.core.networks.family import LABELS, guess_family

UNET, TE, TE2 = "unet", "te", "te2"
UNET_PREFIXES = ("lora_unet_", "lycoris_")

# Resnet children: diffusers name -> ldm name.
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET_TO_LDM.items()}

# Top-level UNet modules outside the block structure: diffusers name -> ldm name.
_UNET_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# OpenCLIP text transformer (SD 2.x, SDXL's second encoder) -> transformers' CLIP, per layer.
_OPEN_CLIP_LAYER = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}
_OPEN_CLIP_TOP = {"ln_final": "final_layer_norm", "token_embedding": "embeddings.token_embedding"}

# Wrappers that hosts insert between a module and its parameters (WebUI hijacks, torch.compile).
_WRAPPER_SEGMENTS = re.compile(r"(?:^|\.)(?:wrapped|_orig_mod)(?=\.)")


# -- public data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One network module applied to one model weight (or a row slice of a fused weight)."""

    component: str  # "unet" | "te" | "te2"
    weight: str  # full parameter name in the model
    rows: tuple[int, int] | None  # row slice of a fused weight (OpenCLIP in_proj), else None
    bias: str | None  # bias parameter when the layer has one and the module can change it
    module: NetworkModule
    key: str  # the kohya name in the network file


@dataclass
class NetworkMapping:
    targets: list[Target]
    unmatched: list[str]  # kohya keys that land nowhere: reported, never silently dropped
    family: str  # the model's: "sd1" | "sd2" | "sdxl" | "unknown"
    layout: str  # the model's: "diffusers" | "ldm" | "unknown"
    unmatched_reasons: list[tuple[str, str]] = field(default_factory=list)
    # Set when the network evidently belongs to another base model (SDXL file on SD 1.x, layers
    # of the wrong width): merging it would write nonsense, so the merge command refuses.
    incompatible: str | None = None


# -- UNet layout conversions (module paths without the ``unet.``/``model.diffusion_model.`` root) --


def unet_diffusers_to_ldm(
    path: str, up_blocks_with_attention: Iterable[int], layers_per_block: int = 2
) -> str | None:
    """``down_blocks.1.resnets.0.conv1`` -> ``input_blocks.4.0.in_layers.2``; None if not a UNet path.

    The ldm UNet numbers its blocks sequentially: input block 0 is conv_in, then every down
    block contributes ``layers_per_block`` (resnet[, attention]) pairs and one downsampler slot;
    every up block ``layers_per_block + 1`` pairs, its upsampler following the attention when
    the block has one. Trailing parts (``.weight``) pass through, so parameter names work too.
    """
    for name, ldm in _UNET_TOP_TO_LDM.items():
        if path == name or path.startswith(name + "."):
            return ldm + path[len(name) :]
    parts = path.split(".")
    stride = layers_per_block + 1
    if len(parts) >= 4 and parts[0] in ("down_blocks", "up_blocks") and parts[1].isdigit():
        block, kind, rest = int(parts[1]), parts[2], parts[4:]
        if not parts[3].isdigit():
            return None
        layer = int(parts[3])
        down = parts[0] == "down_blocks"
        base = 1 + block * stride if down else block * stride
        if kind == "resnets":
            return _join(f"{'input' if down else 'output'}_blocks.{base + layer}.0", _resnet_to_ldm(rest))
        if kind == "attentions":
            return _join(f"{'input' if down else 'output'}_blocks.{base + layer}.1", rest)
        if kind == "downsamplers" and down and layer == 0 and rest[:1] == ["conv"]:
            return _join(f"input_blocks.{base + layers_per_block}.0.op", rest[1:])
        if kind == "upsamplers" and not down and layer == 0 and rest[:1] == ["conv"]:
            slot = 2 if block in set(up_blocks_with_attention) else 1
            return _join(f"output_blocks.{base + layers_per_block}.{slot}.conv", rest[1:])
        return None
    if len(parts) >= 3 and parts[0] == "mid_block" and parts[2].isdigit():
        index, rest = int(parts[2]), parts[3:]
        if parts[1] == "resnets":
            return _join(f"middle_block.{2 * index}", _resnet_to_ldm(rest))
        if parts[1] == "attentions" and index == 0:
            return _join("middle_block.1", rest)
    return None


def unet_ldm_to_diffusers(
    path: str, layers_per_block: int = 2, label_embedding: str = "add_embedding"
) -> str | None:
    """Inverse of :func:`unet_diffusers_to_ldm`: ``input_blocks.4.0.in_layers.2`` -> ``down_blocks.1.resnets.0.conv1``.

    ``label_embedding`` names the diffusers module behind ldm's ``label_emb`` (SDXL:
    ``add_embedding``; class-conditioned SD 2.x variants: ``class_embedding``).
    """
    for name, ldm in _UNET_TOP_TO_LDM.items():
        if name.partition(".")[0] in ("add_embedding", "class_embedding") and not name.startswith(
            label_embedding
        ):
            continue
        if path == ldm or path.startswith(ldm + "."):
            return name + path[len(ldm) :]
    parts = path.split(".")
    stride = layers_per_block + 1
    if (
        len(parts) >= 3
        and parts[0] in ("input_blocks", "output_blocks")
        and parts[1].isdigit()
        and parts[2].isdigit()
    ):
        index, slot, rest = int(parts[1]), int(parts[2]), parts[3:]
        if parts[0] == "input_blocks":
            if index == 0:
                return None  # conv_in, handled above
            block, layer = divmod(index - 1, stride)
            if layer == layers_per_block:
                if slot == 0 and rest[:1] == ["op"]:
                    return _join(f"down_blocks.{block}.downsamplers.0.conv", rest[1:])
                return None
            if slot == 0:
                return _join(f"down_blocks.{block}.resnets.{layer}", _resnet_to_diffusers(rest))
            if slot == 1:
                return _join(f"down_blocks.{block}.attentions.{layer}", rest)
            return None
        block, layer = divmod(index, stride)
        if slot == 0:
            return _join(f"up_blocks.{block}.resnets.{layer}", _resnet_to_diffusers(rest))
        if rest[:1] == ["conv"] and layer == layers_per_block and slot in (1, 2):
            return _join(f"up_blocks.{block}.upsamplers.0.conv", rest[1:])
        if slot == 1:
            return _join(f"up_blocks.{block}.attentions.{layer}", rest)
        return None
    if len(parts) >= 2 and parts[0] == "middle_block" and parts[1].isdigit():
        index, rest = int(parts[1]), parts[2:]
        if index % 2 == 0:
            return _join(f"mid_block.resnets.{index // 2}", _resnet_to_diffusers(rest))
        if index == 1:
            return _join("mid_block.attentions.0", rest)
    return None


def _resnet_to_ldm(rest: list[str]) -> list[str]:
    if rest and rest[0] in _RESNET_TO_LDM:
        return _RESNET_TO_LDM[rest[0]].split(".") + rest[1:]
    return rest


def _resnet_to_diffusers(rest: list[str]) -> list[str]:
    head = ".".join(rest[:2])
    if head in _RESNET_TO_DIFFUSERS:
        return [_RESNET_TO_DIFFUSERS[head]] + rest[2:]
    if rest[:1] == ["skip_connection"]:
        return ["conv_shortcut"] + rest[1:]
    return rest


def _join(head: str, rest: list[str]) -> str:
    return ".".join([head, *rest]) if rest else head


def _kohya(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def _names(prefixes: tuple[str, ...], path: str) -> list[str]:
    return [_kohya(prefix, path) for prefix in prefixes]


# -- layout detection --------------------------------------------------------------------------


def detect_layout(
    param_names: Iterable[str] | Mapping[str, tuple[int, ...]],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[str, str]:
    """(family, layout) of a model from its parameter names: ("sd1"|"sd2"|"sdxl", "diffusers"|"ldm").

    Names tell the layout and SDXL apart. SD 2.x differs from 1.x in a diffusers UNet only by
    widths and by linear (2-D) ``proj_in`` layers, so shapes are used when given (a mapping
    name -> shape may be passed as ``param_names``); without them a diffusers SD 2.x UNet reads
    as "sd1". Returns ("unknown", "unknown") when there is no UNet or text encoder at all.
    """
    if shapes is None and isinstance(param_names, Mapping):
        shapes = param_names
    names = [_canonical(n) for n in param_names]
    diffusers = any(n.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for n in names)
    ldm = any(
        n.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.")) for n in names
    )
    if not diffusers and not ldm:
        return "unknown", "unknown"
    layout = "ldm" if ldm else "diffusers"
    if any(
        n.startswith(
            (
                "text_encoder_2.",
                "conditioner.embedders.",
                "unet.add_embedding.",
                "model.diffusion_model.label_emb.",
            )
        )
        for n in names
    ):
        return "sdxl", layout
    if any(n.startswith("cond_stage_model.model.") for n in names):
        return "sd2", layout  # OpenCLIP text encoder
    if shapes is not None:
        canonical_shapes = {_canonical(n): s for n, s in shapes.items()}
        for name, shape in canonical_shapes.items():
            if name.endswith(".proj_in.weight") and ("unet." in name or "diffusion_model." in name):
                return ("sd2" if len(shape) == 2 else "sd1"), layout
    return "sd1", layout


def _canonical(name: str) -> str:
    return _WRAPPER_SEGMENTS.sub("", name).lstrip(".") if ("wrapped" in name or "_orig_mod" in name) else name


# -- the per-model index ------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """A model weight (or row slice) that kohya names can denote."""

    component: str
    weight: str
    rows: tuple[int, int] | None
    bias: str | None  # the layer's bias parameter, if the model has one
    shape: tuple[int, ...]  # of the weight, or of the row slice


@dataclass
class ModelIndex:
    """kohya name -> model weight, for one model. Build with :func:`model_index` (cached)."""

    family: str
    layout: str
    slots: dict[str, Slot]
    components: frozenset[str]  # which of unet/te/te2 the model has
    # The one name kohya's trainer gives each weight (SD 1.x/2.x UNet: the diffusers path; SDXL
    # UNet: the sgm path; text encoders: ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``): what files
    # this package writes use, so that the WebUI, diffusers' kohya converter and kohya read them.
    kohya_names: dict[Slot, str] = field(default_factory=dict)


def model_index(param_shapes: Mapping[str, tuple[int, ...]]) -> ModelIndex:
    """The index of a model given {parameter name: shape}; cached per distinct model."""
    return _model_index(tuple((name, tuple(shape)) for name, shape in param_shapes.items()))


@lru_cache(maxsize=8)
def _model_index(items: tuple[tuple[str, tuple[int, ...]], ...]) -> ModelIndex:
    shapes = dict(items)
    canonical = {_canonical(name): name for name in shapes}  # wrapper-free name -> real name
    family, layout = detect_layout(canonical, {c: shapes[r] for c, r in canonical.items()})
    slots: dict[str, Slot] = {}
    components: set[str] = set()
    kohya_names: dict[Slot, str] = {}

    def add(keys: Iterable[str], slot: Slot, kohya_name: str | None = None) -> None:
        components.add(slot.component)
        keys = list(keys)
        kohya_names.setdefault(slot, kohya_name or keys[0])
        for key in keys:
            # Distinct modules never share a kohya name in these architectures; if a model ever
            # produced one, the first wins rather than the lookup being order-dependent later.
            slots.setdefault(key, slot)

    def real(name: str) -> str | None:
        return canonical.get(name)

    # UNet ---------------------------------------------------------------------------------
    unet_root = "unet." if layout == "diffusers" else "model.diffusion_model."
    unet_names = [n[len(unet_root) :] for n in canonical if n.startswith(unet_root)]
    layers = _layers_per_block(unet_names, layout)
    up_attention = {
        int(m.group(1)) for n in unet_names if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", n))
    }
    label = "add_embedding" if family == "sdxl" else "class_embedding"
    for path in unet_names:
        module, _, leaf = path.rpartition(".")
        if leaf != "weight" or not module:
            continue
        weight = unet_root + path
        bias = real(unet_root + module + ".bias")
        if layout == "diffusers":
            other = unet_diffusers_to_ldm(module, up_attention, layers)
        else:
            other = unet_ldm_to_diffusers(module, layers, label)
        names = [module] if other is None else [module, other]
        ldm_path, diffusers_path = (other, module) if layout == "diffusers" else (module, other)
        trainer_path = (ldm_path if family == "sdxl" else diffusers_path) or module
        add(
            (_kohya(p, n) for p in UNET_PREFIXES for n in names),
            Slot(UNET, canonical[weight], None, bias, shapes[canonical[weight]]),
            _kohya(UNET_PREFIXES[0], trainer_path),
        )

    # Text encoders ------------------------------------------------------------------------
    for root, component, prefixes, kind in _text_roots(family, layout):
        for name in canonical:
            if name.startswith(root):
                _add_text_weight(add, name[len(root) :], root, component, prefixes, kind, canonical, shapes)

    return ModelIndex(family, layout, slots, frozenset(components), kohya_names)


def _layers_per_block(unet_names: list[str], layout: str) -> int:
    if layout == "diffusers":
        found = [
            int(m.group(1)) for n in unet_names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))
        ]
        return max(found) + 1 if found else 2
    found = [int(m.group(1)) for n in unet_names if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", n))]
    return min(found) - 1 if found else 2


def _text_roots(family: str, layout: str) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(name root, component, kohya prefixes, "hf" | "openclip") for each text encoder."""
    # Forge and ComfyUI convert the OpenCLIP encoders to transformers' layout at load time, so an
    # sgm/ldm model may also hold them as "...transformer.text_model..." (hf) under these roots.
    if family == "sdxl":
        te, te2 = (TE, ("lora_te1_",)), (TE2, ("lora_te2_",))
        if layout == "diffusers":
            return [("text_encoder.", *te, "hf"), ("text_encoder_2.", *te2, "hf")]
        return [
            ("conditioner.embedders.0.transformer.", *te, "hf"),
            ("conditioner.embedders.1.model.", *te2, "openclip"),
            ("conditioner.embedders.1.transformer.", *te2, "hf"),
        ]
    if family == "sd2":
        prefixes: tuple[str, ...] = ("lora_te_",)
        if layout == "ldm":
            return [("cond_stage_model.model.", TE, prefixes, "openclip"), ("cond_stage_model.transformer.", TE, prefixes, "hf")]
    else:
        # Some SD 1.x files spell their (CLIP ViT-L) text encoder lora_te1_, as SDXL's first one;
        # the WebUI accepts them too.
        prefixes = ("lora_te_", "lora_te1_")
        if layout == "ldm":
            return [("cond_stage_model.transformer.", TE, prefixes, "hf")]
    return [("text_encoder.", TE, prefixes, "hf")]


def _add_text_weight(
    add, rel: str, root: str, component: str, prefixes: tuple[str, ...], kind: str, canonical, shapes
) -> None:
    weight = canonical[root + rel]
    shape = tuple(shapes[weight])
    if kind == "hf":
        module, _, leaf = rel.rpartition(".")
        if leaf != "weight" or not module:
            return
        bias = canonical.get(root + module + ".bias")
        # transformers 5 may drop the ``text_model.`` level; kohya names always have it.
        if module.startswith(("encoder.", "embeddings.", "final_layer_norm")):
            module = "text_model." + module
        add(_names(prefixes, module), Slot(component, weight, None, bias, shape))
        return
    # OpenCLIP: transformer.resblocks.N.<part> -> text_model.encoder.layers.N.<hf part>
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|in_proj_weight)", rel)
    if m:
        layer, part, leaf = m.groups()
        hf_root = f"text_model.encoder.layers.{layer}."
        if leaf == "in_proj_weight" and part == "attn":
            # Fused q/k/v: one weight of 3d rows, each projection a block of d rows.
            d = shape[0] // 3
            bias = canonical.get(root + rel.replace("in_proj_weight", "in_proj_bias"))
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                rows = (i * d, (i + 1) * d)
                add(
                    _names(prefixes, hf_root + "self_attn." + proj),
                    Slot(component, weight, rows, bias, (d, *shape[1:])),
                )
            return
        if leaf == "weight" and part in _OPEN_CLIP_LAYER:
            bias = canonical.get(root + rel[: -len("weight")] + "bias")
            add(
                _names(prefixes, hf_root + _OPEN_CLIP_LAYER[part]), Slot(component, weight, None, bias, shape)
            )
        return
    module, _, leaf = rel.rpartition(".")
    if leaf == "weight" and module in _OPEN_CLIP_TOP:
        bias = canonical.get(root + module + ".bias")
        add(
            _names(prefixes, "text_model." + _OPEN_CLIP_TOP[module]),
            Slot(component, weight, None, bias, shape),
        )


# -- mapping a network ----------------------------------------------------------------------------


def map_network(
    network_modules: Mapping[str, NetworkModule],
    param_shapes: Mapping[str, tuple[int, ...]] | ModelIndex,
) -> NetworkMapping:
    """Targets for every module of a network in a model given as {parameter name: shape}.

    Keys that match no weight, or whose ΔW cannot have the weight's size, are listed in
    ``unmatched`` (with the reason in ``unmatched_reasons``).
    """
    index = param_shapes if isinstance(param_shapes, ModelIndex) else model_index(param_shapes)
    targets: list[Target] = []
    reasons: list[tuple[str, str]] = []
    wrong_shape: list[tuple[str, str]] = []
    if index.layout == "unknown":
        reasons = [(key, "the model has no UNet or text encoder parameters") for key in network_modules]
        return NetworkMapping([], [k for k, _ in reasons], index.family, index.layout, reasons)
    guess = guess_family(network_modules)
    if guess.contradicts(index.family):
        reason = f"the network is for {guess.label}, the model is {LABELS[index.family]}"
        reasons = [(key, reason) for key in network_modules]
        return NetworkMapping(
            [], list(network_modules), index.family, index.layout, reasons, incompatible=reason
        )
    for key, module in network_modules.items():
        slot = index.slots.get(key)
        if slot is None:
            reasons.append((key, _why_unmatched(key, index)))
            continue
        problem = module.fits(slot.shape)
        if problem is not None:
            wrong_shape.append((key, f"{problem} ({slot.weight}{_rows(slot)})"))
            reasons.append(wrong_shape[-1])
            continue
        bias = slot.bias if module.changes_bias else None
        targets.append(Target(slot.component, slot.weight, slot.rows, bias, module, key))
    incompatible = None
    if wrong_shape:
        key, reason = wrong_shape[0]
        incompatible = (
            f"{len(wrong_shape)} layer(s) have the wrong size for this {LABELS[index.family]} model "
            f"(first: {key}: {reason})"
        )
    return NetworkMapping(targets, [k for k, _ in reasons], index.family, index.layout, reasons, incompatible)


def misfit(mapping: NetworkMapping, module_count: int) -> str | None:
    """Why a network cannot be applied to the model at all, or None.

    The merge command and the diffusers runner refuse such a network (a file for another base
    model, layers of the wrong width, nothing matching), naming how many layers do not fit and
    the first one; a network of which only some layers match is applied with a warning.
    """
    if mapping.layout == "unknown":
        return "the model has no UNet or text encoder weights"
    family = LABELS.get(mapping.family, mapping.family)
    if mapping.incompatible:
        if mapping.incompatible.startswith(f"{len(mapping.unmatched)} "):  # wrong sizes: counted already
            return f"does not fit this {family} model: {mapping.incompatible}"
        key = mapping.unmatched[0] if mapping.unmatched else "-"
        return (
            f"does not fit this {family} model: {mapping.incompatible} "
            f"({len(mapping.unmatched)} of {module_count} layers unmatched, first: {key})"
        )
    if module_count and not mapping.targets:
        key, reason = mapping.unmatched_reasons[0]
        return (
            f"none of its {module_count} layers matches this {family} model "
            f"(first: {key}: {reason}); is it for another base model?"
        )
    return None


def _why_unmatched(key: str, index: ModelIndex) -> str:
    component = key_component(key)
    if component is None:
        return "not a known kohya prefix (lora_unet_, lycoris_, lora_te_, lora_te1_, lora_te2_)"
    if component not in index.components:
        return f"the model has no {'UNet' if component == UNET else 'text encoder'} ({component})"
    return f"no {component} layer of this {index.family} model has this name"


def key_component(key: str) -> str | None:
    """The component a kohya key addresses ("unet", "te", "te2"), or None for an unknown prefix."""
    if key.startswith(UNET_PREFIXES):
        return UNET
    if key.startswith(("lora_te_", "lora_te1_")):
        return TE
    if key.startswith("lora_te2_"):
        return TE2
    return None


def _rows(slot: Slot) -> str:
    return f" rows {slot.rows[0]}:{slot.rows[1]}" if slot.rows else ""
