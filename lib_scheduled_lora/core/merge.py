"""Baking networks at constant strengths into a model: W' = W + Σ w_k · ΔW_k.

Two levels:

* :func:`merge_networks` — pure: a state dict (names as :mod:`lib_scheduled_lora.core.naming` reads
  them) and networks in, the changed tensors and a report out.
* :func:`merge_model` — files: a diffusers folder or a single-file ldm/sgm ``.safetensors``
  checkpoint in, the same layout out, written atomically; the ``merge`` command uses it.

Every changed weight is accumulated in float32 from the original and rounded once to its own
dtype, so fp16/bf16 checkpoints stay in their dtype and untouched rows of a fused weight (and
every untouched tensor) keep their exact bits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_scheduled_lora.core.combine import Term, combine
from lib_scheduled_lora.core.naming import ModelIndex, NetworkMapping, map_network, misfit, model_index
from lib_scheduled_lora.core.networks.base import Network, NetworkModule
from lib_scheduled_lora.core.numbers import NumberSyntaxError, looks_like_a_number, read_number
from lib_scheduled_lora.core.staging import EXISTS, check_output, remove_stale, staged_folder
from lib_scheduled_lora.errors import ModelFormatError, NetworkFileError, OutputPathError, path_text

# progress(label, done, total): called after each weight; the caller's bar (terminal, WebUI).
Progress = Callable[[str, int, int], None]

# Components of a diffusers pipeline that networks can change, and the names naming.py expects.
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


# -- reports ---------------------------------------------------------------------------------


@dataclass
class NetworkReport:
    """What became of one network."""

    name: str
    path: str
    weight: float
    matched: int  # modules merged (or, at weight 0, that would have been)
    unmatched: list[str]
    unmatched_reasons: list[tuple[str, str]]
    unrecognised_keys: list[str]  # file keys the loader could not read as any module

    def warning(self) -> str | None:
        """One line for the console when something of the network was not merged."""
        parts = []
        if self.unmatched:
            key, reason = self.unmatched_reasons[0]
            parts.append(
                f"{len(self.unmatched)} layer(s) match nothing in the model (first: {key}: {reason})"
            )
        if self.unrecognised_keys:
            parts.append(
                f"{len(self.unrecognised_keys)} key(s) are not a known module type "
                f"(first: {self.unrecognised_keys[0]})"
            )
        return f"{self.path}: " + "; ".join(parts) if parts else None


@dataclass
class MergeReport:
    tensors: dict[str, torch.Tensor]  # new values of every changed parameter; the rest is unchanged
    networks: list[NetworkReport]
    family: str
    layout: str


@dataclass
class _Part:
    """One network module's contribution to one weight."""

    rows: tuple[int, int] | None
    module: NetworkModule
    multiplier: float
    bias: str | None
    key: str
    path: str


@dataclass
class MergePlan:
    """What to add to which weight: built from names and shapes only, applied file by file."""

    parts: dict[str, list[_Part]]  # weight name -> contributions
    networks: list[NetworkReport]
    family: str
    layout: str
    biases: set[str] = field(default_factory=set)

    def touches(self, names: Iterable[str]) -> bool:
        return any(n in self.parts or n in self.biases for n in names)


# -- the maths (no files) ------------------------------------------------------------------


def plan_merge(
    param_shapes: Mapping[str, tuple[int, ...]] | ModelIndex,
    networks: Sequence[tuple[Network, float]],
    *,
    strict: bool = False,
) -> MergePlan:
    """Map every network onto the model; refuse networks that do not belong to it.

    Raises NetworkFileError (naming the network file) when a network is for another base model,
    when none of its layers matches, or — with ``strict`` — when any layer is left unmatched.
    """
    index = param_shapes if isinstance(param_shapes, ModelIndex) else model_index(param_shapes)
    parts: dict[str, list[_Part]] = {}
    biases: set[str] = set()
    reports = []
    for network, multiplier in networks:
        mapping = map_network(network.modules, index)
        _check_mapping(network, mapping, strict)
        for target in mapping.targets:
            part = _Part(target.rows, target.module, float(multiplier), target.bias, target.key, network.path)
            parts.setdefault(target.weight, []).append(part)
            if target.bias:
                biases.add(target.bias)
        reports.append(
            NetworkReport(
                name=network.name,
                path=network.path,
                weight=float(multiplier),
                matched=len(mapping.targets),
                unmatched=list(mapping.unmatched),
                unmatched_reasons=list(mapping.unmatched_reasons),
                unrecognised_keys=list(network.unrecognised_keys),
            )
        )
    return MergePlan(parts, reports, index.family, index.layout, biases)


def _check_mapping(network: Network, mapping: NetworkMapping, strict: bool) -> None:
    problem = misfit(mapping, len(network.modules))
    if problem is not None:
        raise NetworkFileError(network.path, problem)
    if strict and mapping.unmatched:
        key, reason = mapping.unmatched_reasons[0]
        raise NetworkFileError(
            network.path,
            f"{len(mapping.unmatched)} of its layers match nothing in the model (first: {key}: {reason}); "
            "--strict refuses to merge it partly",
        )
    if strict and network.unrecognised_keys:
        raise NetworkFileError(
            network.path,
            f"{len(network.unrecognised_keys)} of its keys are no known module type "
            f"(first: {network.unrecognised_keys[0]}); --strict refuses to merge it partly",
        )


def apply_plan(
    plan: MergePlan,
    state_dict: Mapping[str, torch.Tensor],
    *,
    progress: Progress | None = None,
    label: str = "",
) -> dict[str, torch.Tensor]:
    """New tensors for every planned weight (and bias) present in ``state_dict``; inputs untouched.

    ``progress(label, done, total)`` is called after every weight (a terminal bar, the WebUI's
    progress bar; it may raise to cancel). See :func:`merged_weight` for the arithmetic.
    """
    out: dict[str, torch.Tensor] = {}
    names = [n for n in plan.parts if n in state_dict]
    for done, name in enumerate(names, 1):
        new = merged_weight(plan, name, state_dict.__getitem__)
        if new is not None:
            out[name] = new
        if progress is not None:
            progress(label, done, len(names))
    for name in sorted(plan.biases):
        if name in state_dict:
            new = merged_bias(plan, name, state_dict.__getitem__)
            if new is not None:
                out[name] = new
    return out


def merged_weight(
    plan: MergePlan, name: str, read: Callable[[str], torch.Tensor], dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """The planned weight ``name`` (read with ``read``), or None when every strength on it is 0.

    Each weight (or row slice of a fused weight) goes through the engine's kernel
    (:func:`lib_scheduled_lora.core.combine.combine`): float32 from the original, one rounding to
    ``dtype`` (default: the weight's own).
    """
    regions: dict[tuple[int, int] | None, list[Term]] = {}
    for part in plan.parts.get(name, ()):
        if part.multiplier != 0.0:
            regions.setdefault(part.rows, []).append(Term(part.multiplier, part.module))
    if not regions:
        return None
    return _combined(read(name), regions, dtype)


def merged_bias(
    plan: MergePlan, name: str, read: Callable[[str], torch.Tensor], dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """The planned bias ``name`` (full/norm modules' ``diff_b``/``b_norm``), or None when unchanged.

    Needs only the bias itself: a bias difference does not depend on the weight."""
    base = None
    regions: dict[tuple[int, int] | None, list[Term]] = {}
    for parts in plan.parts.values():
        for part in parts:
            if part.bias != name or part.multiplier == 0.0:
                continue
            base = read(name) if base is None else base
            bias_delta = part.module.bias_delta(_rows(base, part.rows))
            if bias_delta is not None:
                regions.setdefault(part.rows, []).append(Term(part.multiplier, None, bias_delta))
    if base is None or not regions:
        return None
    return _combined(base, regions, dtype)


def _combined(
    base: torch.Tensor,
    regions: Mapping[tuple[int, int] | None, list[Term]],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``base`` with each region (all rows, or a row slice) combined with its terms; rows no term
    touches keep their exact bits (converted to ``dtype`` when given)."""
    dtype = dtype or base.dtype
    if None in regions:
        assert len(regions) == 1, "a weight is targeted whole or by row slices, not both"
        return combine(base, regions[None], out=torch.empty(base.shape, dtype=dtype, device=base.device))
    new = base.to(dtype, copy=True)
    for rows, terms in regions.items():
        combine(_rows(base, rows), terms, out=_rows(new, rows))
    return new


def _rows(tensor: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return tensor if rows is None else tensor[rows[0] : rows[1]]


def merge_networks(
    state_dict: Mapping[str, torch.Tensor],
    networks: Sequence[tuple[Network, float]],
    *,
    strict: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Merge ``networks`` (network, strength) into a whole model's state dict.

    Names are those of a diffusers pipeline (``unet.``/``text_encoder.``/``text_encoder_2.``
    prefixes) or of a single-file checkpoint. Returns the changed tensors only; ``state_dict``
    is not modified. Raises NetworkFileError for networks that do not fit (see :func:`plan_merge`).
    """
    plan = plan_merge({k: tuple(v.shape) for k, v in state_dict.items()}, networks, strict=strict)
    tensors = apply_plan(plan, state_dict, progress=progress)
    return MergeReport(tensors, plan.networks, plan.family, plan.layout)


# -- files ------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    output: str
    report: MergeReport  # its ``tensors`` stay empty: a file merge streams them to disk
    files_written: list[str]  # weight files rewritten (relative to the output for a folder)
    changed: list[str] = field(default_factory=list)  # parameters changed (names as merge_networks')


def merge_model(
    model: str | os.PathLike,
    networks: Sequence[tuple[Network, float]],
    output: str | os.PathLike,
    *,
    force: bool = False,
    strict: bool = False,
    progress: Progress | None = None,
    components: Mapping[str, Sequence[str]] | None = None,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> MergeResult:
    """Merge into a diffusers folder or a single-file checkpoint, writing ``output`` in the same layout.

    Tensor by tensor (:mod:`lib_scheduled_lora.core.bake`): peak memory is about one layer.
    ``dtype`` converts every floating-point tensor (None: each keeps its own); ``metadata`` is
    added to each written file's own. ``components``: for a model folder that is not a diffusers
    one (the built-in demo model), its weight files per component (``{"unet":
    ["unet.safetensors"], ...}``, relative to the folder); by default a folder's
    ``model_index.json`` says.

    ``output`` appears complete or not at all (see :mod:`lib_scheduled_lora.core.staging`: what an
    interrupted merge leaves and how the next run removes it); an existing one is replaced only
    with ``force``. Raises ModelFormatError (model problems), OutputPathError (where the output
    cannot go, checked before the model is read) or NetworkFileError (network problems).
    """
    model, output = Path(model), Path(output)
    if not model.exists():
        raise ModelFormatError(model, "not found")
    check_merge_output(model, output, force=force)
    remove_stale(output.parent)  # a killed run's staging copy may be as large as the model
    options = dict(force=force, strict=strict, progress=progress, dtype=dtype, metadata=metadata)
    if model.is_dir():
        return _merge_folder(model, networks, output, components=components, **options)
    return _merge_file(model, networks, output, **options)


def check_merge_output(model: str | os.PathLike, output: str | os.PathLike, *, force: bool = False) -> None:
    """Where a merge of ``model`` may not write ``output``: raised before anything is read."""
    model, output = Path(model), Path(output)
    check_output(output, OutputPathError, folder_output=model.is_dir())
    if output.exists() or output.is_symlink():
        if not force:
            raise OutputPathError(output, EXISTS)
        if output.resolve() == model.resolve():
            raise OutputPathError(output, "is the model itself; write the merge somewhere else")
        if output.is_dir() != model.is_dir():
            kind = "a folder" if output.is_dir() else "a file"
            raise OutputPathError(output, f"is {kind}; --force only replaces a merge output of the same kind")
    if model.is_dir() and output.resolve().is_relative_to(model.resolve()):
        raise OutputPathError(output, f"is inside the model folder {path_text(model)}; choose another place")


def _merge_file(model, networks, output, *, force, strict, progress, dtype, metadata) -> MergeResult:
    from lib_scheduled_lora.core.bake import bake_file
    from lib_scheduled_lora.core.safetensors_stream import SafetensorsReader

    with SafetensorsReader(model) as reader:  # the header only, checked
        index = model_index(reader.shapes)
    if index.layout == "unknown":
        raise ModelFormatError(
            model,
            "not a Stable Diffusion checkpoint: no UNet or text encoder weights "
            "(for a diffusers model, pass its folder)",
        )
    plan = plan_merge(index, networks, strict=strict)
    baked = bake_file(
        model, output, plan, dtype=dtype, metadata=metadata, force=force, progress=progress, label=model.name,
        error=OutputPathError,
    )
    report = MergeReport({}, plan.networks, plan.family, plan.layout)
    return MergeResult(str(output), report, [output.name], baked.changed)


@dataclass
class _WeightFile:
    component: str
    path: Path
    shapes: dict[str, tuple[int, ...]]  # file key -> shape (header only)


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file without reading its data."""
    from lib_scheduled_lora.core.networks.files import read_safetensors_header

    try:
        header = read_safetensors_header(path)
    except NetworkFileError as exc:
        raise ModelFormatError(path, exc.problem) from None
    return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def _variant(path: Path) -> str:
    """'' for ``model.safetensors`` / shards of it, 'fp16' for ``model.fp16.safetensors``..."""
    stem = _SHARD.sub("", path.name[: -len(".safetensors")])
    return stem.partition(".")[2]


def _weight_files(model: Path, components: Mapping[str, Sequence[str]] | None = None) -> list[_WeightFile]:
    if components is not None:
        listed = [(c, model / name) for c, names in components.items() for name in names]
        for _, path in listed:
            if not path.is_file():
                raise ModelFormatError(path, "missing from the model folder")
        return [_WeightFile(c, path, _header_shapes(path)) for c, path in listed]
    index_file = model / "model_index.json"
    if not index_file.is_file():
        raise ModelFormatError(model, "not a diffusers model folder (no model_index.json)")
    try:
        declared = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(index_file, f"unreadable model_index.json ({exc})") from None
    files = []
    for component in DIFFUSERS_COMPONENTS:
        folder = model / component
        if component not in declared or not folder.is_dir():
            continue
        found = sorted(folder.glob("*.safetensors"))
        if not found and any(folder.glob("*.bin")):
            raise ModelFormatError(
                folder,
                "holds only pickle (.bin) weights; only .safetensors models are merged (convert it first)",
            )
        files += [_WeightFile(component, p, _header_shapes(p)) for p in found]
    if not files:
        raise ModelFormatError(model, "no UNet or text encoder .safetensors weights in this diffusers folder")
    return files


def _model_shapes(files: list[_WeightFile]) -> dict[str, tuple[int, ...]]:
    """The parameters of one variant per component (the default one when present): all variants
    share names and shapes, so mapping once is enough and applies to every file."""
    shapes: dict[str, tuple[int, ...]] = {}
    for component in DIFFUSERS_COMPONENTS:
        mine = [f for f in files if f.component == component]
        if not mine:
            continue
        variants = sorted({_variant(f.path) for f in mine})
        chosen = "" if "" in variants else variants[0]
        for f in mine:
            if _variant(f.path) == chosen:
                shapes.update({f"{component}.{k}": s for k, s in f.shapes.items()})
    return shapes


def _merge_folder(model, networks, output, *, force, strict, progress, dtype, metadata, components=None) -> MergeResult:
    from lib_scheduled_lora.core.bake import bake_file

    files = _weight_files(model, components)
    plan = plan_merge(_model_shapes(files), networks, strict=strict)
    rewritten = {f.path: f for f in files if plan.touches(f"{f.component}.{k}" for k in f.shapes)}

    changed_all: list[str] = []
    written: list[str] = []
    with staged_folder(output, OutputPathError, replace=force) as staging:
        for source in sorted(model.rglob("*")):
            relative = source.relative_to(model)
            destination = staging / relative
            if source.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            weight_file = rewritten.get(source)
            if weight_file is None and (dtype is None or source.suffix != ".safetensors"):
                if source.is_file():  # a FIFO or socket in a model folder is nothing to copy
                    shutil.copy2(source, destination)  # byte-identical; follows hub-cache symlinks
                continue
            baked = bake_file(
                source,
                destination,
                plan,
                prefix=weight_file.component + "." if weight_file else "",
                dtype=dtype,
                metadata=metadata,
                force=True,
                progress=progress,
                label=str(relative),
                error=OutputPathError,
            )
            changed_all += baked.changed
            if weight_file is not None:
                written.append(str(relative))
    report = MergeReport({}, plan.networks, plan.family, plan.layout)
    return MergeResult(str(output), report, written, changed_all)


def load_networks(specs: Sequence[tuple[str, float]]) -> list[tuple[Network, float]]:
    """Load (file, strength) pairs; NetworkFileError names the first unreadable file."""
    from lib_scheduled_lora.core.networks.loader import load_network

    return [(load_network(path), weight) for path, weight in specs]


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``FILE[:W]`` -> (FILE, W); W defaults to 1 and follows the schedule grammar's number syntax.

    A colon not followed by something meant as a number is part of FILE
    (``C:\\loras\\x.safetensors``); ``x.safetensors:nan`` (or ``inf``, ``1e999``) is an error.
    """
    path, sep, tail = spec.rpartition(":")
    # A tail meant as a number, or one after an existing file (``x.safetensors:1_0``), is a strength.
    if sep and path and (looks_like_a_number(tail) or (Path(path).is_file() and not Path(spec).exists())):
        try:
            return path, read_number(tail)
        except NumberSyntaxError as exc:
            raise NetworkFileError(path, f"strength {exc.text!r} after ':' {exc.problem}") from None
    return spec, 1.0
