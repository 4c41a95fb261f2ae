"""A sweep on a diffusers pipeline: every cell through :func:`~lib_scheduled_lora.hosts.runner.generate`
(the same attach, sampler and seed as ``generate``), plus the two reference images, and the
numbers of each cell. The WebUI tab runs cells through the host's own processing instead."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lib_scheduled_lora.core.library import NetworkLibrary
from lib_scheduled_lora.core.sweep import Cell, SweepPlan, cell_numbers
from lib_scheduled_lora.hosts.runner import GenerationRequest, generate

Metrics = Callable[[Any, Cell], dict[str, float]]


@dataclass
class SweepRun:
    plan: SweepPlan
    images: list[Any] = field(default_factory=list)  # row by row, as plan.cells
    infotexts: list[str] = field(default_factory=list)
    numbers: list[dict[str, float]] = field(default_factory=list)
    references: dict[str, Any] = field(default_factory=dict)  # label -> image


def run_sweep(
    pipe: Any,
    plan: SweepPlan,
    request: GenerationRequest,
    library: NetworkLibrary,
    *,
    model_label: str,
    metrics: Metrics | None = None,
    with_numbers: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> SweepRun:
    """Generate the references and every cell with ``request``'s settings (its prompt is replaced)."""
    run = SweepRun(plan)
    total = len(plan.cells) + (2 if with_numbers else 0)
    done = 0
    if with_numbers:
        for label, prompt in plan.references().items():
            result = generate(pipe, dataclasses.replace(request, prompt=prompt), library, model_label=model_label)
            run.references[label] = result.image
            done += 1
            if progress is not None:
                progress("images", done, total)
    for cell in plan.cells:
        result = generate(pipe, dataclasses.replace(request, prompt=cell.prompt), library, model_label=model_label)
        run.images.append(result.image)
        run.infotexts.append(result.infotext)
        numbers = cell_numbers(result.image, run.references) if with_numbers else {}
        if metrics is not None:
            numbers.update(metrics(result.image, cell))
        run.numbers.append(numbers)
        done += 1
        if progress is not None:
            progress("images", done, total)
    return run
