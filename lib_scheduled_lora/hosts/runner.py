"""The standalone runner: a diffusers pipeline, a prompt with scheduled tags, one PNG.

Library use, for diffusers users who bring their own pipeline:

    library = NetworkLibrary.scan(["loras/"])
    networks = scheduled_networks(prompt, library)
    with attach(pipe, networks):
        image = pipe(strip_network_tags(prompt), num_inference_steps=20).images[0]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_scheduled_lora.core.engine import EngineSettings, ScheduledNetwork
from lib_scheduled_lora.errors import ModelFormatError
from lib_scheduled_lora.core.library import NetworkLibrary, strip_network_tags, tags_in_prompt
from lib_scheduled_lora.hosts.samplers import LABELS, make_scheduler


def scheduled_networks(prompt: str, library: NetworkLibrary, *, hires: bool = False) -> list[ScheduledNetwork]:
    """Load every network the prompt's tags name, with the schedules of the chosen pass."""
    from lib_scheduled_lora.core.networks.loader import load_network

    networks = []
    for text, tag in tags_in_prompt(prompt):  # raises the first syntax error
        network = load_network(library.find(tag.name, text), name=tag.name)
        if tag.dyn is not None:
            network = network.rank_limited(tag.dyn)
        te, unet = tag.schedules(hires)
        networks.append(ScheduledNetwork(network=network, te=te, unet=unet))
    return networks


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    model: str | None = None  # None: the built-in demo model
    config: str | None = None
    lora_dirs: tuple[str, ...] = ()
    steps: int = 20
    cfg_scale: float | None = None
    seed: int = 1
    sampler: str = "euler"
    width: int | None = None
    height: int | None = None
    mode: str = "auto"


@dataclass
class GenerationResult:
    image: Any  # PIL.Image
    infotext: str
    model_label: str
    unet_multipliers: dict[str, list[float]] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Write the PNG with the WebUI-style ``parameters`` text chunk, atomically."""
        import os
        import tempfile

        from PIL.PngImagePlugin import PngInfo

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        info.add_text("parameters", self.infotext)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                self.image.save(handle, format="PNG", pnginfo=info)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_pipeline(model: str | None, config: str | None = None) -> tuple[Any, str, list[str]]:
    """(pipeline, label for the output, default network folders) for ``--model``."""
    if model is None:
        from lib_scheduled_lora.demo import model as demo

        return demo.load_demo_pipeline(), "built-in demo model", [str(demo.NETWORK_DIR)]
    import diffusers

    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelFormatError(model, "not a diffusers folder (no model_index.json)")
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True)
    elif path.is_file() and path.suffix == ".safetensors":
        kwargs: dict[str, Any] = {"local_files_only": True}
        if config:
            kwargs["config"] = config
        try:
            pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        except Exception as exc:  # diffusers needs the model's configs; offline it cannot fetch them
            raise ModelFormatError(model, f"cannot load as a single-file checkpoint ({exc}); pass --config DIR") from exc
    else:
        raise ModelFormatError(model, "no such diffusers folder or .safetensors checkpoint")
    return pipe, path.name, []


def generate(request: GenerationRequest, *, progress: bool = False) -> GenerationResult:
    import torch

    from lib_scheduled_lora.hosts.diffusers import attach

    tags_in_prompt(request.prompt)  # a malformed tag fails before the model is loaded
    pipe, label, default_dirs = load_pipeline(request.model, request.config)
    library = NetworkLibrary.scan(list(request.lora_dirs) or default_dirs)
    networks = scheduled_networks(request.prompt, library)  # errors before any sampling
    pipe.scheduler = make_scheduler(request.sampler, pipe.scheduler.config)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not progress)
    kwargs: dict[str, Any] = {
        "prompt": strip_network_tags(request.prompt),
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": request.steps,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
    }
    for key, value in (("guidance_scale", request.cfg_scale), ("width", request.width), ("height", request.height)):
        if value is not None:
            kwargs[key] = value
    with attach(pipe, networks, EngineSettings(mode=request.mode)) as attached, torch.no_grad():
        image = pipe(**kwargs).images[0]
        positions = list(attached.positions)
    multipliers = {n.name: [n.unet.at(p, request.steps) for p in positions] for n in networks}
    return GenerationResult(image, _infotext(request, image.size, label), label, multipliers)


def _infotext(request: GenerationRequest, size: tuple[int, int], model_label: str) -> str:
    """The WebUI's 'parameters' text, so the PNG can be read back by the WebUI."""
    fields = {
        "Steps": request.steps,
        "Sampler": LABELS[request.sampler],
        "CFG scale": request.cfg_scale,
        "Seed": request.seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model": model_label,
        "Scheduled LoRA mode": None if request.mode == "auto" else request.mode,
    }
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)
