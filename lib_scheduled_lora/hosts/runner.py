"""The standalone runner: a diffusers pipeline, a prompt with scheduled tags, one PNG.

Library use, for diffusers users who bring their own pipeline (keep the library object: it keeps
the loaded networks, so repeated generations read and rebuild nothing):

    library = NetworkLibrary.scan(["loras/"])
    networks = scheduled_networks(prompt, library)
    with attach(pipe, networks):
        image = pipe(strip_network_tags(prompt), num_inference_steps=20).images[0]

The ``generate`` command chooses the pipeline (a model given by path, or the built-in demo model)
and calls :func:`generate`; nothing here knows the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_scheduled_lora.core.engine import EngineSettings, Mode, ScheduledNetwork
from lib_scheduled_lora.core.library import NetworkLibrary, strip_network_tags
from lib_scheduled_lora.core.tags import tags_in_prompt
from lib_scheduled_lora.errors import ModelFormatError, NetworkFileError, OutputPathError, elide
from lib_scheduled_lora.hosts.ownership import check_arguments
from lib_scheduled_lora.hosts.samplers import LABELS, make_scheduler


def scheduled_networks(prompt: str, library: NetworkLibrary, *, hires: bool = False) -> list[ScheduledNetwork]:
    """The networks every tag of ``prompt`` names, with the schedules of the chosen pass.

    Raises the first malformed tag's ScheduleSyntaxError, a LoRA Block Weight argument (which only
    the WebUI's own Lora acts on) and a missing network, before anything is loaded.
    """
    tags = tags_in_prompt(prompt)
    for text, tag in tags:
        check_arguments(text, tag)
        library.find(tag.name, text)
    return [ScheduledNetwork(library.load(tag, text), *tag.schedules(hires)) for text, tag in tags]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float | None = None
    seed: int = 1
    sampler: str = "euler"
    width: int | None = None
    height: int | None = None
    mode: Mode = "auto"


@dataclass
class GenerationResult:
    image: Any  # PIL.Image
    infotext: str
    model_label: str
    unet_multipliers: dict[str, list[float]] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Write the PNG with the WebUI-style ``parameters`` text chunk, atomically: missing folders
        are created, and on any failure (a full disk, an interruption) nothing is left behind."""
        from PIL.PngImagePlugin import PngInfo

        from lib_scheduled_lora.core.staging import staged_file

        info = PngInfo()
        info.add_text("parameters", self.infotext)
        with staged_file(path, OutputPathError, create_parents=True) as tmp:
            self.image.save(tmp, format="PNG", pnginfo=info)


def check_model(model: str, config: str | None = None) -> None:
    """Raise ModelFormatError when ``model`` cannot be a diffusers folder or a single-file SD
    checkpoint, from its files alone (cheap: headers only), before anything is loaded."""
    from lib_scheduled_lora.core.naming import model_index
    from lib_scheduled_lora.core.networks.files import read_safetensors_header

    path = Path(model)
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise ModelFormatError(config, "--config must be a diffusers model folder (no model_index.json)")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelFormatError(model, "not a diffusers folder (no model_index.json)")
        return
    if not path.exists():
        raise ModelFormatError(model, "no such diffusers folder or .safetensors checkpoint")
    if path.suffix.lower() != ".safetensors":
        raise ModelFormatError(model, "not a diffusers folder or a .safetensors checkpoint")
    try:
        header = read_safetensors_header(path)
    except NetworkFileError as exc:  # corrupt, truncated, a pickle, a FIFO...
        raise ModelFormatError(model, exc.problem) from None
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    if model_index(shapes).layout == "unknown":
        raise ModelFormatError(model, "not a Stable Diffusion checkpoint: no UNet or text encoder weights")


def load_pipeline(model: str, config: str | None = None) -> tuple[Any, str]:
    """(pipeline, label for the output) for a diffusers folder or a single-file checkpoint."""
    import diffusers

    check_model(model, config)
    path = Path(model)
    try:
        if path.is_dir():
            pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True)
        else:
            kwargs: dict[str, Any] = {"local_files_only": True}
            if config:
                kwargs["config"] = config
            pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - any library failure means this model cannot be used
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # A sound single-file SD checkpoint fails offline only for want of its configs.
        hint = "; pass --config DIR (a diffusers folder of the same model type)" if path.is_file() and not config else ""
        raise ModelFormatError(model, f"cannot load it ({elide(first, 120)}){hint}") from None
    return pipe, path.name


def check_networks_fit(pipe: Any, networks: list[ScheduledNetwork]) -> None:
    """Refuse a network that cannot apply to ``pipe``'s model at all (another base model, layers of
    the wrong width, nothing matching), as the merge command does, before sampling."""
    from torch import nn

    from lib_scheduled_lora.core.naming import map_network, misfit, model_index
    from lib_scheduled_lora.hosts.diffusers import COMPONENTS

    # the parameter names the engine binds (hosts/diffusers.py groups the same components)
    shapes = {
        f"{name}.{key}": tuple(param.shape)
        for name in COMPONENTS
        if isinstance(getattr(pipe, name, None), nn.Module)
        for key, param in getattr(pipe, name).named_parameters()
    }
    index = model_index(shapes)
    for scheduled in networks:
        network = scheduled.network
        problem = misfit(map_network(network.modules, index), len(network.modules))
        if problem is not None:
            raise NetworkFileError(network.path, problem)


def generate(
    pipe: Any, request: GenerationRequest, library: NetworkLibrary, *, model_label: str, progress: bool = False
) -> GenerationResult:
    """One image of ``request`` on ``pipe``, with the networks of ``library`` the prompt names."""
    import torch

    from lib_scheduled_lora.hosts.diffusers import attach

    networks = scheduled_networks(request.prompt, library)  # errors before any sampling
    check_networks_fit(pipe, networks)
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
    return GenerationResult(image, _infotext(request, image.size, model_label), model_label, multipliers)


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
