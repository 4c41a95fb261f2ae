"""The companion tab's logic, for any WebUI: merging (bake into a checkpoint, several networks into
one, resize, extract) and sweeps, from what the tab's fields hold. No WebUI import here: a host's
tab module (``a1111_tab.py``) builds the widgets, gives the folders, the model files and a
progress/cancel pair, and runs the sweep's cells through its own processing.

Names typed in the tab never become paths by themselves: input networks are looked up in an index
of the network folders (:class:`~lib_scheduled_lora.core.library.NetworkLibrary`), models come from
the host's own list, and output names go through
:func:`~lib_scheduled_lora.core.output_names.confined_output`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lib_scheduled_lora
from lib_scheduled_lora.core.library import NetworkLibrary
from lib_scheduled_lora.core.lowrank import RankRule
from lib_scheduled_lora.core.numbers import NumberSyntaxError, read_number
from lib_scheduled_lora.core.output_names import confined_output
from lib_scheduled_lora.core.sweep import Axis, SweepPlan, plan_sweep
from lib_scheduled_lora.errors import Cancelled, OutputNameError, RankRuleError

TOOL = f"sd-webui-scheduled-lora {lib_scheduled_lora.__version__}"
RULES = ("exact", "rank", "sv_ratio", "sv_fro", "sv_cumulative")
DTYPES = ("fp16", "bf16", "fp32")
# sweep axis kind -> the XYZ grid's axis of the same meaning (hosts/xyz.AXES)
XYZ_LABELS = {
    "strength": "Scheduled LoRA: strength",
    "schedule": "Scheduled LoRA: schedule",
    "switch": "Scheduled LoRA: switch point",
    "hires": "Scheduled LoRA: hires schedule",
    "ramp": "Scheduled LoRA: ramp shape",
    "te": "Scheduled LoRA: te strength",
    "unet": "Scheduled LoRA: unet strength",
}


@dataclass
class Folders:
    """Where names are looked up and outputs go (the first folder of each list)."""

    networks: list[Path]
    checkpoints: list[Path]

    def library(self) -> NetworkLibrary:
        return NetworkLibrary.scan(self.networks)


class Progress:
    """The host's progress bar and cancel button as the core's ``progress(label, done, total)``."""

    def __init__(self, show: Callable[[str, int, int], None] | None = None, cancelled: Callable[[], bool] | None = None):
        self.show, self.cancelled = show, cancelled

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("cancelled; nothing was written")
        if self.show is not None:
            self.show(label, done, total)


@dataclass
class Outcome:
    """What the tab shows after a merge: the file written and the report."""

    path: Path
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([f"wrote {self.path}", *self.lines])


# -- fields -> arguments ----------------------------------------------------------------------


def parse_network_specs(text: str) -> list[tuple[str, float]]:
    """``"a:0.7, b:-0.4"`` (or one per line; strength 1 when left out) -> [(name, strength)]."""
    specs = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, tail = item.rpartition(":")
        if not sep:
            name, tail = item, "1"
        try:
            specs.append((name.strip(), read_number(tail)))
        except NumberSyntaxError as exc:
            raise RankRuleError(f"network {item!r}", f"strength {exc.text!r} {exc.problem}") from None
    if not specs:
        raise RankRuleError("networks", "name at least one network (name:strength)")
    return specs


def rank_rule(method: str, rank: float | int | None, conv_rank: float | int | None, param: float | None) -> RankRule | None:
    """The rule the tab's fields give (``method`` "exact": None). Sliders send floats; 0 means unset."""
    if method not in RULES:
        raise RankRuleError(str(method), f"is not one of {', '.join(RULES)}")
    if method == "exact":
        return None

    def whole(value) -> int | None:
        return int(value) if value else None

    return RankRule(method, whole(rank), whole(conv_rank), None if method == "rank" else param)


def network_dtype(name: str):
    from lib_scheduled_lora.core.network_writer import NETWORK_DTYPES

    if name not in NETWORK_DTYPES:
        raise RankRuleError(str(name), f"is not one of {', '.join(NETWORK_DTYPES)}")
    return NETWORK_DTYPES[name]


def _output(folder: Path, name: str, overwrite: bool) -> Path:
    path = confined_output(folder, name)
    if path.exists() and not overwrite:
        raise OutputNameError(name, f"{path.name} already exists in {folder}; tick 'overwrite' to replace it")
    return path


# -- merging ---------------------------------------------------------------------------------


def bake_checkpoint(
    model: Path,
    specs: Sequence[tuple[str, float]],
    output_name: str,
    folders: Folders,
    *,
    dtype: str = "keep",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Outcome:
    """Networks at their strengths baked into a copy of the single-file checkpoint ``model``
    (written to the first checkpoint folder; its ``.yaml`` config is copied beside it)."""
    from lib_scheduled_lora.core.bake import OUTPUT_DTYPES
    from lib_scheduled_lora.core.merge import merge_model
    from lib_scheduled_lora.core.network_writer import baked_metadata, source_records

    if dtype not in OUTPUT_DTYPES:
        raise RankRuleError(str(dtype), f"is not one of {', '.join(OUTPUT_DTYPES)}")
    output = _output(folders.checkpoints[0], output_name, overwrite)
    library = folders.library()
    paths = [(library.find(name), weight) for name, weight in specs]
    networks = [(library.loaded.load(path, name), weight) for (path, weight), (name, _) in zip(paths, specs)]
    metadata = baked_metadata(
        source_records([(str(p), w, "network") for p, w in paths]), dtype=dtype, tool=TOOL
    )
    result = merge_model(
        model, networks, output, force=overwrite, progress=progress, dtype=OUTPUT_DTYPES[dtype], metadata=metadata
    )
    config = model.with_suffix(".yaml")
    if config.is_file():  # the WebUI finds a model's config beside it (SD 2.x v-models, odd widths)
        _copy_atomic(config, output.with_suffix(".yaml"))
    lines = []
    for net in result.report.networks:
        lines.append(f"{net.name} at {net.weight:g}: {net.matched} layer(s) merged, {len(net.unmatched)} unmatched")
        if net.warning():
            lines.append(f"warning: {net.warning()}")
    lines.append(f"{len(result.changed)} tensor(s) changed ({result.report.family}, dtype {dtype})")
    return Outcome(output, lines)


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def merge_networks(
    specs: Sequence[tuple[str, float]],
    output_name: str,
    folders: Folders,
    rule: RankRule | None,
    *,
    model: Path | None = None,
    dtype: str = "fp16",
    overwrite: bool = False,
    progress: Progress | None = None,
    operation: str = "merge-networks",
) -> Outcome:
    """Several networks (names from the network folders) -> one file in the first network folder."""
    from lib_scheduled_lora.core.model_reader import ModelReader
    from lib_scheduled_lora.core.network_merge import merge_into_one, report_lines, warning_lines
    from lib_scheduled_lora.core.network_writer import made_metadata, source_records, write_network

    torch_dtype = network_dtype(dtype)
    output = _output(folders.networks[0], output_name, overwrite)
    library = folders.library()
    paths = [(library.find(name), weight) for name, weight in specs]
    networks = [(library.loaded.load(path, name), weight) for (path, weight), (name, _) in zip(paths, specs)]
    if model is not None:
        with ModelReader(model) as reader:
            merged = merge_into_one(networks, rule, model=reader, progress=progress)
            family = reader.index.family
    else:
        merged = merge_into_one(networks, rule, progress=progress)
        family = None
    records = source_records([(str(p), w, "network") for p, w in paths])
    extra = {"base_model": model.name} if model is not None else None
    metadata = made_metadata(operation, merged, records, family=family, extra=extra, tool=TOOL)
    write_network(merged, output, metadata, dtype=torch_dtype, force=overwrite)
    return Outcome(output, report_lines(merged) + [f"warning: {w}" for w in warning_lines(merged)])


def extract_network(
    base: Path,
    tuned: Path,
    output_name: str,
    folders: Folders,
    rule: RankRule,
    *,
    dtype: str = "fp16",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Outcome:
    from lib_scheduled_lora.core.extract import extract_lora
    from lib_scheduled_lora.core.model_reader import ModelReader
    from lib_scheduled_lora.core.network_merge import report_lines
    from lib_scheduled_lora.core.network_writer import made_metadata, source_records, write_network

    if rule.rank is None:
        raise RankRuleError("extract", "needs a rank (the largest rank with an sv_* rule)")
    torch_dtype = network_dtype(dtype)
    output = _output(folders.networks[0], output_name, overwrite)
    with ModelReader(base) as b, ModelReader(tuned) as t:
        extracted = extract_lora(b, t, rule, progress=progress)
        family = b.index.family
    if not extracted.layers:
        raise RankRuleError("extract", f"{tuned.name} does not differ from {base.name} in any LoRA layer")
    records = source_records([(str(base), None, "base"), (str(tuned), None, "tuned")])
    metadata = made_metadata("extract", extracted, records, family=family, tool=TOOL)
    write_network(extracted, output, metadata, dtype=torch_dtype, force=overwrite)
    return Outcome(output, report_lines(extracted) + [f"{extracted.unchanged} layer(s) unchanged"])


# -- sweeps ----------------------------------------------------------------------------------


def sweep_plan(
    prompt: str,
    network: str | None,
    x_kind: str,
    x_values: str,
    y_kind: str | None,
    y_values: str | None,
    *,
    same_mean: bool = False,
    steps: int = 20,
) -> SweepPlan:
    """The plan the Sweep tab's fields describe (values in the XYZ grid's syntax)."""
    x = Axis.parse(x_kind, x_values)
    y = Axis.parse(y_kind, y_values or "") if y_kind and y_kind != "none" and (y_values or "").strip() else None
    return plan_sweep(prompt, x, y, network=(network or None), steps=int(steps), same_mean=same_mean)


def xyz_fields(plan: SweepPlan) -> list[tuple[str, str]]:
    """(XYZ axis label, values text) for the plan's x and y axes, ready for the X/Y/Z plot script."""
    return [(XYZ_LABELS[kind], text) for kind, text in plan.xyz_axes()]
