"""Baking a merge plan into one ``.safetensors`` weight file, one tensor at a time.

The source is read tensor by tensor and each tensor is written as soon as it is final
(:mod:`lib_scheduled_lora.core.safetensors_stream`), so peak memory is about one layer (plus its
float32 accumulator) instead of two models. Used for single-file checkpoints and for each
rewritten weight file of a diffusers folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_scheduled_lora.core.safetensors_stream import Planned, SafetensorsReader, StreamingWriter
from lib_scheduled_lora.errors import ModelFormatError, ScheduledLoraError

# Output dtypes by the names the commands and the tab use.
OUTPUT_DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}


@dataclass
class BakedFile:
    changed: list[str]  # names (as the plan knows them, i.e. with the prefix) of changed tensors
    bytes_written: int


def output_dtype(source: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    """Floating-point tensors take ``wanted``; integer and bool tensors (position ids) keep theirs."""
    return wanted if wanted is not None and source.is_floating_point else source


def bake_file(
    source: str | os.PathLike,
    output: str | os.PathLike,
    plan,
    *,
    prefix: str = "",
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    progress=None,
    label: str = "",
    error: type[ScheduledLoraError] = ModelFormatError,
) -> BakedFile:
    """Write ``output``: ``source`` with ``plan`` (a :class:`~lib_scheduled_lora.core.merge.MergePlan`)
    applied, its tensors in ``dtype`` (None: each keeps its own), its metadata updated with
    ``metadata``. ``prefix`` turns the file's tensor names into the plan's (``"unet."`` for a
    diffusers component). ``progress(label, done, total)`` after every changed weight; it may
    raise to cancel (nothing is left behind).
    """
    from lib_scheduled_lora.core.merge import merged_bias, merged_weight

    with SafetensorsReader(source) as reader:
        names = list(reader.entries)
        planned = [Planned(n, output_dtype(reader.entries[n].dtype, dtype), reader.entries[n].shape) for n in names]

        def read(name: str) -> torch.Tensor:
            return reader.read(name[len(prefix) :])

        weights = [n for n in names if prefix + n in plan.parts]
        changed: list[str] = []
        done = 0
        merged_metadata = {**reader.metadata, **(metadata or {})}
        with StreamingWriter(output, planned, merged_metadata, force=force, error=error) as writer:
            for item in planned:
                name = prefix + item.name
                new = None
                if name in plan.parts:
                    new = merged_weight(plan, name, read, item.dtype)
                    done += 1
                elif name in plan.biases:
                    new = merged_bias(plan, name, read, item.dtype)
                if new is not None:
                    changed.append(name)
                else:
                    new = reader.read(item.name).to(item.dtype)
                writer.write(item.name, new)
                del new
                if name in plan.parts and progress is not None:
                    progress(label, done, len(weights))
        return BakedFile(changed, Path(output).stat().st_size)
