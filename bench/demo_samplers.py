"""How close every sampler's demo images are to DDIM's at the same seed (the numbers behind
tests/test_demo_samplers.py and the README's sampler note).

    python bench/demo_samplers.py [--steps 10] [--sets 3]

For each set of seeds (4 prompts, one seed each, sets start at 0, 4, 8 ...): the mean absolute
pixel difference (images in [0, 1]) of every sampler to DDIM, its total variation (high-frequency
energy: noise reads 5x a clean image), and DDIM against DDIM at other seeds (unrelated images).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["a white wday", "a red square", "a blue circle", "a wday"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sets", type=int, default=3)
    args = parser.parse_args()

    import torch

    from lib_scheduled_lora.demo import model as demo
    from lib_scheduled_lora.hosts.samplers import SAMPLERS, make_scheduler

    torch.set_num_threads(1)
    pipe = demo.load_demo_pipeline()
    config = pipe.scheduler.config

    def render(sampler: str, first: int) -> torch.Tensor:
        pipe.scheduler = make_scheduler(sampler, config)
        generators = [torch.Generator().manual_seed(first + i) for i in range(len(PROMPTS))]
        return pipe(PROMPTS, num_inference_steps=args.steps, guidance_scale=3.0, generator=generators).tensors

    def variation(t: torch.Tensor) -> float:
        return float((t[..., 1:, :] - t[..., :-1, :]).abs().mean() + (t[..., 1:] - t[..., :-1]).abs().mean())

    for s in range(args.sets):
        first = 4 * s
        ddim = render("ddim", first)
        other = float((render("ddim", 100 + first) - ddim).abs().mean())
        cells = []
        for name in sorted(SAMPLERS):
            images = render(name, first)
            cells.append(f"{name} {float((images - ddim).abs().mean()):.3f}/{variation(images):.3f}")
        print(f"seeds {first}-{first + 3}, {args.steps} steps: other seeds {other:.3f}; " + ", ".join(cells))


if __name__ == "__main__":
    main()
