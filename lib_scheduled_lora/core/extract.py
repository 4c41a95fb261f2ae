"""A LoRA from the difference of two checkpoints (a fine-tune minus its base), layer by layer.

For every weight the model index names (each of the base model's layers, by the name kohya's
trainer gives it), the tuned model's weight is found through its own index (so the two may be in
different layouts), ``ΔW = W_tuned − W_base`` is formed in float32 and cut by the rank rule
(:mod:`lib_scheduled_lora.core.lowrank`). Two layers are in memory at a time.

Which layers: every Linear and 1×1-conv weight that differs; k×k convolutions only when the rule
has a ``conv_rank`` (kohya's ``extract_lora_from_models.py`` does the same with ``--conv_dim``).
Embedding tables and 1-D (norm) weights are not LoRA layers: when they differ they are counted
in the report, not extracted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lib_scheduled_lora.core.lowrank import RankRule, default_device, is_kxk_conv, low_rank
from lib_scheduled_lora.core.model_reader import ModelReader
from lib_scheduled_lora.core.network_merge import LayerReport, MergedNetwork
from lib_scheduled_lora.errors import ModelFormatError

Progress = Callable[[str, int, int], None]


@dataclass
class Extracted(MergedNetwork):
    unchanged: int = 0  # layers where the two models are equal (or within min_diff)
    not_extracted: list[str] = field(default_factory=list)  # differing weights a LoRA cannot hold


def extract_lora(
    base: ModelReader,
    tuned: ModelReader,
    rule: RankRule,
    *,
    min_diff: float = 0.0,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> Extracted:
    """The LoRA ``tuned − base`` (see the module docstring). Layers whose largest difference is
    at most ``min_diff`` are treated as unchanged. Raises ModelFormatError when the two are not
    the same architecture."""
    if (base.index.family, base.index.components) != (tuned.index.family, tuned.index.components):
        raise ModelFormatError(
            tuned.path,
            f"is {tuned.index.family} ({', '.join(sorted(tuned.index.components))}), the base model "
            f"{base.path.name} is {base.index.family} ({', '.join(sorted(base.index.components))})",
        )
    device = torch.device(device) if device is not None else default_device()
    slots = list(base.index.kohya_names.items())
    include_conv = rule.conv_rank is not None
    result = Extracted({}, [], rule)
    cache: dict[str, tuple[str, torch.Tensor]] = {}  # one weight per model (fused q/k/v rows share one)

    def read(reader: ModelReader, weight: str, rows) -> torch.Tensor:
        key = str(reader.path)
        if key not in cache or cache[key][0] != weight:
            cache[key] = (weight, reader.read(weight))
        tensor = cache[key][1]
        return tensor if rows is None else tensor[rows[0] : rows[1]]

    for done, (slot, name) in enumerate(slots, 1):
        other = tuned.index.slots.get(name)
        if other is None or other.shape != slot.shape:
            raise ModelFormatError(
                tuned.path, f"has no layer {name} of shape {list(slot.shape)} (the base model has); another architecture?"
            )
        delta = read(tuned, other.weight, other.rows).to(device, torch.float32) - read(
            base, slot.weight, slot.rows
        ).to(device, torch.float32)
        largest = float(delta.abs().max()) if delta.numel() else 0.0
        if largest <= min_diff:
            result.unchanged += 1
        elif len(slot.shape) not in (2, 4) or _is_table(name):
            result.not_extracted.append(name)
        elif is_kxk_conv(slot.shape) and not include_conv:
            result.not_extracted.append(name)
        else:
            cut = low_rank(delta, rule, device=device)
            result.tensors[f"{name}.lora_up.weight"] = cut.up
            result.tensors[f"{name}.lora_down.weight"] = cut.down
            result.tensors[f"{name}.alpha"] = torch.tensor(float(cut.rank))
            exact = cut.rank >= cut.full_rank or cut.fro_kept >= 1.0 - 1e-7
            result.layers.append(
                LayerReport(name, ("full",), slot.shape, None, cut.rank, cut.full_rank, cut.fro_kept, cut.sum_kept, exact)
            )
        del delta
        if progress is not None:
            progress("layers", done, len(slots))
    return result


def _is_table(name: str) -> bool:
    """Token and position embedding tables (lookups, not matrix products)."""
    return name.endswith(("token_embedding", "position_embedding"))
