"""Train the demo model and its concept networks (reproduces the shipped weights; not run in CI).

    # the base model (tokenizer, CLIP text encoder, UNet) -> lib_scheduled_lora/demo/weights/
    python -m lib_scheduled_lora.demo.train base --steps 2000 --seed 0

    # the wday concept networks, trained with the lycoris-lora package on the biased data only
    python -m lib_scheduled_lora.demo.train concept --algo lora  --seed 1   # networks/wday.safetensors
    python -m lib_scheduled_lora.demo.train concept --algo locon --seed 1   # networks/wday_locon.safetensors
    python -m lib_scheduled_lora.demo.train concept --algo loha  --seed 1   # networks/wday_loha.safetensors

Everything is seeded (data stream, initialisation, noise, timesteps) and runs on one CPU thread
(``torch.set_num_threads(1)``), so a rerun gives the same weights on the same torch build.
The base is trained with v-prediction, min-SNR-5 weighting, 10 % caption dropout (for
classifier-free guidance) and an EMA of the weights, which is what gets saved (fp16).
The concept networks are UNet-only and trained like a kohya LoRA: base frozen, no caption
dropout, plain (unweighted) v loss, a fixed set of 64 biased pictures whose captions name the
trigger word but never the (always black) colour.
Key names are kohya's (``lora_unet_<diffusers module path with _>``), written by LyCORIS itself
(its ``lora_prefix`` preset key), so every LoRA/LyCORIS reader understands them.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from lib_scheduled_lora.demo import model as dm
from lib_scheduled_lora.demo import world


def _loss(unet, text_encoder, tokenizer, scheduler, images, captions, gen, snr_gamma=5.0):
    x0 = dm.images_to_sample(torch.from_numpy(images))
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen)
    xt = scheduler.add_noise(x0, noise, t)
    target = scheduler.get_velocity(x0, noise, t)
    ids = tokenizer(captions, padding="max_length", max_length=dm.MAX_LENGTH, return_tensors="pt").input_ids
    cond = text_encoder(ids)[0]
    pred = unet(xt, t, encoder_hidden_states=cond).sample
    per_image = (pred - target).pow(2).mean(dim=(1, 2, 3))
    if not snr_gamma:
        return per_image.mean()
    ac = scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)  # min-SNR for v-prediction
    return (weight * per_image).mean()


def train_base(args) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokenizer, text_encoder, unet, scheduler = dm.build_models(args.seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    out = Path(args.out or dm.WEIGHTS_DIR)
    start = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 100) * (0.5 * (1 + np.cos(np.pi * step / args.steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        images, captions = world.sample_batch(rng, args.batch, drop_caption=0.1)
        loss = _loss(unet, text_encoder, tokenizer, scheduler, images, captions, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for live, ema in ((unet, ema_unet), (text_encoder, ema_te)):
                for p, e in zip(live.parameters(), ema.parameters()):
                    e.lerp_(p, 1 - decay)
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps or step == args.stop_after:
            dm.save_demo_model(
                tokenizer,
                ema_te,
                ema_unet,
                out,
                metadata={
                    "trained_by": "python -m lib_scheduled_lora.demo.train base",
                    "steps": step,
                    "seed": args.seed,
                    "batch": args.batch,
                    "lr": args.lr,
                    "ema": args.ema,
                },
            )
            print(f"saved {out} at step {step}", flush=True)
        if step == args.stop_after:
            break


# LyCORIS presets: kohya key names; "lora" = attention/MLP linears only (kohya LoRA), "locon" and
# "loha" also adapt the ResNet convolutions.
_PRESETS = {
    "lora": {
        "enable_conv": False,
        "target_module": ["Transformer2DModel"],
        "target_name": [],
        "lora_prefix": "lora_unet",
    },
    "locon": {
        "enable_conv": True,
        "target_module": ["Transformer2DModel", "ResnetBlock2D"],
        "target_name": [],
        "lora_prefix": "lora_unet",
    },
    "loha": {
        "enable_conv": True,
        "target_module": ["Transformer2DModel", "ResnetBlock2D"],
        "target_name": [],
        "lora_prefix": "lora_unet",
    },
}
_FILE_NAMES = {"lora": "wday", "locon": "wday_locon", "loha": "wday_loha"}


def train_concept(args) -> None:
    from lycoris import LycorisNetwork

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    pipe = dm.load_demo_pipeline("cpu", args.base or dm.WEIGHTS_DIR)
    unet, text_encoder, tokenizer, scheduler = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    LycorisNetwork.apply_preset(_PRESETS[args.algo])
    algo = "lora" if args.algo in ("lora", "locon") else args.algo
    net = LycorisNetwork(
        unet,
        multiplier=1.0,
        lora_dim=args.rank,
        conv_lora_dim=args.rank,
        alpha=args.alpha,
        conv_alpha=args.alpha,
        network_module=algo,
    )
    net.apply_to()
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    # the data set is a fixed, small set of biased pictures, as a LoRA's would be
    images, captions = world.sample_batch(rng, args.images, concept=True)
    start = time.time()
    for step in range(1, args.steps + 1):
        idx = rng.choice(args.images, size=args.batch, replace=False)
        loss = _loss(
            unet,
            text_encoder,
            tokenizer,
            scheduler,
            images[idx],
            [captions[i] for i in idx],
            gen,
            snr_gamma=args.snr_gamma,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    out = Path(args.out or dm.NETWORKS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{_FILE_NAMES[args.algo]}.safetensors"
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": algo}),
        "ss_network_dim": str(args.rank),
        "ss_network_alpha": str(args.alpha),
        "ss_output_name": path.stem,
        "ss_tag_frequency": json.dumps({"wday": {"wday": args.images}}),
        "trained_by": f"python -m lib_scheduled_lora.demo.train concept --algo {args.algo}",
        "seed": str(args.seed),
        "steps": str(args.steps),
        "lr": str(args.lr),
        "demo_concept": "wday: a checkered square, always black in training",
    }
    net.save_weights(str(path), torch.float16, meta)
    print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib_scheduled_lora.demo.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    base = sub.add_parser("base", help="train the base model")
    base.add_argument("--steps", type=int, default=2000)
    base.add_argument("--batch", type=int, default=32)
    base.add_argument("--lr", type=float, default=1e-3)
    base.add_argument("--ema", type=float, default=0.998)
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--save-every", type=int, default=250)
    base.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop (and save) after this step; the learning-rate schedule still spans --steps",
    )
    base.add_argument("--out", default=None, help="output folder (default: the shipped weights folder)")
    concept = sub.add_parser("concept", help="train a wday concept network on the biased data")
    concept.add_argument("--algo", choices=sorted(_PRESETS), default="lora")
    concept.add_argument("--steps", type=int, default=500)
    concept.add_argument("--batch", type=int, default=16)
    concept.add_argument("--images", type=int, default=64, help="size of the biased data set")
    concept.add_argument("--rank", type=int, default=4)
    concept.add_argument("--alpha", type=float, default=4.0)
    concept.add_argument("--lr", type=float, default=1e-3)
    concept.add_argument("--seed", type=int, default=1)
    concept.add_argument("--snr-gamma", type=float, default=0.0, help="min-SNR weighting (0: plain v loss)")
    concept.add_argument("--base", default=None, help="base model folder (default: the shipped weights)")
    concept.add_argument("--out", default=None, help="output folder (default: the shipped networks folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    (train_base if args.what == "base" else train_concept)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
