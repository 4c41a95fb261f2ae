"""The demo model: a tiny pixel-space text-to-image diffusion model of Stable Diffusion's family.

* UNet: diffusers ``UNet2DConditionModel`` (ResNet blocks, ``CrossAttnDownBlock2D`` /
  ``CrossAttnUpBlock2D`` with transformer blocks, cross-attention to the text encoder), so that
  networks use the real SD layer names
  (``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k`` ...).
  Its sample space is the 32x32 RGB image in [-1, 1], losslessly folded 2x2 into 12 channels at
  16x16 (``pixel_unshuffle``; the "VAE" of this world is that exact, parameter-free fold), which
  makes the model 4x cheaper on a CPU while keeping every pixel.
* Text encoder: transformers ``CLIPTextModel`` (2 layers, width 64) with the world's
  word-level :class:`~lib_scheduled_lora.demo.tokenizer.DemoTokenizer`.
* Scheduler: DDIM, cosine noise schedule, v-prediction, "trailing" spacing.

``DemoPipeline.__call__`` runs the standard loop (``set_timesteps``; per timestep
``scale_model_input``, one batched uncond+cond ``unet`` call, ``step``), so hooks that follow
``scheduler.timesteps`` (the engine's ``attach``) work on it as on ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lib_scheduled_lora.demo import world
from lib_scheduled_lora.demo.layout import (  # noqa: F401 - where the model lives, re-exported
    IMAGE_SIZE,
    NETWORKS_DIR,
    PACKAGE_DIR,
    WEIGHT_FILES,
    WEIGHTS_DIR,
    is_demo_folder,
    network_path,
)
from lib_scheduled_lora.demo.tokenizer import DemoTokenizer

MAX_LENGTH = 16
assert IMAGE_SIZE == world.SIZE

FOLD = 2  # pixel_unshuffle factor between images and the UNet's sample space

UNET_CONFIG = dict(
    sample_size=world.SIZE // FOLD,
    in_channels=3 * FOLD * FOLD,
    out_channels=3 * FOLD * FOLD,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(48, 64, 96),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    clip_sample=True,
    clip_sample_range=1.0,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
)


def images_to_sample(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, 32, 32) in [-1, 1] -> the UNet's (n, 12, 16, 16) sample space (exact fold)."""
    return torch.nn.functional.pixel_unshuffle(images, FOLD)


def sample_to_images(sample: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`images_to_sample`."""
    return torch.nn.functional.pixel_shuffle(sample, FOLD)


def text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=64,
        pad_token_id=DemoTokenizer.pad_token_id,
        bos_token_id=DemoTokenizer.bos_token_id,
        eos_token_id=DemoTokenizer.eos_token_id,
    )


def build_tokenizer() -> DemoTokenizer:
    return DemoTokenizer(world.VOCAB, MAX_LENGTH)


def build_models(seed: int = 0):
    """Fresh (untrained) tokenizer, text encoder, UNet and scheduler, initialised from ``seed``."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(text_config(len(tokenizer)))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return tokenizer, text_encoder, unet, scheduler


@dataclass
class DemoOutput:
    images: list  # PIL images
    tensors: torch.Tensor  # (n, 3, H, W) float32 in [0, 1]


class DemoPipeline(DiffusionPipeline):
    """Text-to-image pipeline of the demo model (pixel space, classifier-free guidance)."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        width: int | None = None,
        height: int | None = None,
        **unused,
    ) -> DemoOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if negative_prompt is None:
            negative_prompt = ""
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        n = len(prompts)
        device, size = self.unet.device, self.unet.config.sample_size
        if latents is None:
            gens = generator if isinstance(generator, list) else [generator] * n
            latents = torch.stack(
                [
                    torch.randn((self.unet.config.in_channels, size, size), generator=g, dtype=torch.float32)
                    for g in gens
                ]
            )
        # The grid first: a sigma-space scheduler's init_noise_sigma is the first sigma of the grid
        # it was set to (before set_timesteps it describes the 1000-step training grid).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = latents.to(device) * self.scheduler.init_noise_sigma
        cond = (
            self.encode_prompt(negatives + prompts) if guidance_scale != 1.0 else self.encode_prompt(prompts)
        )
        timesteps = self.scheduler.timesteps
        # Ancestral samplers draw fresh noise every step: from the caller's generators (one per
        # image), so that a seed gives the same image every time, as in diffusers' pipelines.
        step_kwargs = {}
        if generator is not None and "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator
        with self.progress_bar(total=len(timesteps)) as bar:  # diffusers' bar: set_progress_bar_config
            for t in timesteps:
                model_in = torch.cat([x, x]) if guidance_scale != 1.0 else x
                model_in = self.scheduler.scale_model_input(model_in, t)
                out = self.unet(model_in, t, encoder_hidden_states=cond).sample
                if guidance_scale != 1.0:
                    uncond, text = out.chunk(2)
                    out = uncond + guidance_scale * (text - uncond)
                x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
                bar.update()
        tensors = (sample_to_images(x) / 2 + 0.5).clamp(0, 1).float().cpu()
        images = []
        if output_type == "pil":
            from PIL import Image

            arr = (tensors.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
            images = [Image.fromarray(a) for a in arr]
        return DemoOutput(images=images, tensors=tensors)


def save_demo_model(
    tokenizer, text_encoder, unet, directory: str | Path = WEIGHTS_DIR, metadata=None
) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    save_file(
        {k: v.detach().half().contiguous() for k, v in unet.state_dict().items()},
        directory / "unet.safetensors",
        meta,
    )
    save_file(
        {k: v.detach().half().contiguous() for k, v in text_encoder.state_dict().items()},
        directory / "text_encoder.safetensors",
        meta,
    )
    tokenizer.save(directory / "tokenizer.json")
    (directory / "config.json").write_text(
        json.dumps(
            {
                "unet": UNET_CONFIG,
                "text_encoder": text_encoder.config.to_dict(),
                "scheduler": SCHEDULER_CONFIG,
            },
            indent=1,
            default=list,
        )
    )


def load_demo_pipeline(device: str = "cpu", directory: str | Path = WEIGHTS_DIR) -> DemoPipeline:
    """The shipped demo model (offline, ~a few MB), as a :class:`DemoPipeline` in float32."""
    from safetensors.torch import load_file

    from lib_scheduled_lora.errors import ModelFormatError

    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
        tokenizer = DemoTokenizer.from_file(directory / "tokenizer.json")
        te_config = dict(config["text_encoder"])
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **{k: v for k, v in te_config.items() if k in text_config(len(tokenizer)).to_dict()}
            )
        )
        unet = UNet2DConditionModel(**config["unet"])
        _load_exactly(unet, load_file(directory / "unet.safetensors"), directory / "unet.safetensors")
        te_file = directory / "text_encoder.safetensors"
        _load_exactly(text_encoder, _text_model_level(load_file(te_file), text_encoder), te_file)
    except ModelFormatError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise ModelFormatError(
            str(directory),
            f"cannot load the demo model ({exc}); "
            "train it with `python -m lib_scheduled_lora.demo.train base`",
        ) from exc
    scheduler = DDIMScheduler(**config["scheduler"])
    pipe = DemoPipeline(
        unet=unet.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)  # quiet for library use; the commands turn it on
    return pipe.to(device)


def _text_model_level(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The saved text encoder's names in the installed transformers' spelling: transformers 5's
    CLIPTextModel has no ``text_model.`` level, 4.x has; the file holds one of the two."""
    want = any(k.startswith("text_model.") for k in model.state_dict())
    have = any(k.startswith("text_model.") for k in state)
    if want and not have:
        return {f"text_model.{k}": v for k, v in state.items()}
    if have and not want:
        return {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def _load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Every parameter from the file and nothing else: a missing key would leave random weights."""
    from lib_scheduled_lora.errors import ModelFormatError

    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        what = f"{len(missing)} missing key(s) (first: {missing[0]})" if missing else ""
        what += ("; " if what else "") + (f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else "")
        raise ModelFormatError(str(source), f"does not match the demo model: {what}")
