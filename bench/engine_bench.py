"""Seconds per generation on the SD 1.5 (or SDXL) UNet: no LoRA, static LoRA, step schedule,
ramp, and the re-merge-from-CPU-backup reference that older per-step tools use.

    python bench/engine_bench.py                      # CPU, 256x256, SD 1.5 UNet, random weights
    python bench/engine_bench.py --device cuda        # 512x512 on a GPU, fp16
    python bench/engine_bench.py --device cuda --model sdxl --size 1024 --steps 30

On CUDA each row also gives the peak device memory of its generation and the extra over static
LoRA (``torch.cuda.max_memory_allocated``); everywhere, the engine's own holdings by role
(originals kept as copies, merge buffers, ΔW, forward factors).

Every configuration runs once to warm up, then ``--runs`` times interleaved (a, b, c, a, b, c,
...) so that drifts in machine speed hit all of them alike; the table shows medians and ratios
to static LoRA measured in the same run. "Static LoRA" is the host's steady state for a plain
``<lora:x:1>``: the weights merged once, before the timed generations.

It also measures one merged update (every targeted layer rewritten) against the machine's
plain tensor-copy bandwidth, the physical limit of such an update.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.random_networks import write_network  # noqa: E402

from lib_scheduled_lora.core.delta_cache import DeltaCache  # noqa: E402
from lib_scheduled_lora.core.engine import EngineSettings, ScheduledNetwork, ScheduledWeights  # noqa: E402
from lib_scheduled_lora.core.live import BufferPool  # noqa: E402
from lib_scheduled_lora.core.naming import map_network  # noqa: E402
from lib_scheduled_lora.core.networks.loader import load_network  # noqa: E402
from lib_scheduled_lora.core.schedule import Schedule, parse_schedule  # noqa: E402

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
STEP, RAMP = "0@0.3:1", "0@0,1@1"


@dataclass
class Config:
    label: str
    network: str | None  # "lora" / "locon" / "loha", None for no LoRA
    kind: str  # "none", "static", "scheduled", "reference"
    schedule: str = "1"
    mode: str = "auto"


def build_unet(device: str, dtype: torch.dtype, model: str = "sd15"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**(SDXL_UNET if model == "sdxl" else SD15_UNET)).to(device=device, dtype=dtype).eval()


class Generation:
    """A minimal Euler loop: the UNet calls are what costs; the scheduler would add noise."""

    def __init__(self, unet, size: int, steps: int, batch: int, device: str, dtype: torch.dtype):
        self.unet, self.steps = unet, steps
        latent = size // 8
        gen = torch.Generator("cpu").manual_seed(1)
        self.x0 = torch.randn(batch, 4, latent, latent, generator=gen).to(device, dtype)
        width = unet.config.cross_attention_dim
        self.context = torch.randn(batch, 77, width, generator=gen).to(device, dtype)
        self.added: dict[str, torch.Tensor] | None = None
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size conditioning
            self.added = {
                "text_embeds": torch.randn(batch, 1280, generator=gen).to(device, dtype),
                "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch).to(device, dtype),
            }
        self.timesteps = torch.linspace(999, 0, steps).tolist()

    @torch.no_grad()
    def __call__(self, before_step: Callable[[int], None] = lambda i: None) -> torch.Tensor:
        x = self.x0
        for i, t in enumerate(self.timesteps):
            before_step(i)
            eps = self.unet(x, t, encoder_hidden_states=self.context, added_cond_kwargs=self.added).sample
            x = x - eps * (1.0 / self.steps)
        return x


class RemergeFromBackup:
    """What loractl (through A1111's Lora extension) does on every multiplier change: restore each
    targeted weight from a CPU backup, then rebuild ΔW from the network's factors and add it."""

    def __init__(self, unet, network, schedule: Schedule):
        self.schedule = schedule
        params = {f"unet.{n}": p for n, p in unet.named_parameters()}
        mapping = map_network(network.modules, {n: tuple(p.shape) for n, p in params.items()})
        self.layers = [(params[t.weight].data, t.module) for t in mapping.targets]
        self.backup = [w.detach().to("cpu", copy=True) for w, _ in self.layers]
        self.last: float | None = None

    def before_step(self, step: int, steps: int) -> None:
        m = self.schedule.at(step, steps)
        if m == self.last:
            return
        self.last = m
        with torch.no_grad():
            for (weight, module), backup in zip(self.layers, self.backup):
                weight.copy_(backup.to(weight.device))
                if m:
                    delta = module.weight_delta(weight)
                    weight.copy_((weight.float() + m * delta).to(weight.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            for (weight, _), backup in zip(self.layers, self.backup):
                weight.copy_(backup.to(weight.device))
        self.last = None


def copy_bandwidth(device: str, mb: int = 256, repeats: int = 7) -> float:
    """Bytes per second of a plain device-to-device tensor copy (read + write)."""
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def update_bandwidth(unet, network, device: str, cache: DeltaCache, repeats: int = 7) -> tuple[float, int]:
    """Bytes per second moved by a full merged update of every targeted layer, and its bytes."""
    model = torch.nn.ModuleDict({"unet": unet})
    scheduled = ScheduledNetwork(network, te=Schedule.constant(1.0), unet=parse_schedule(RAMP))
    steps = repeats + 2
    with ScheduledWeights(model, [scheduled], EngineSettings(mode="merge"), cache=cache) as weights:
        weights.set_position("unet", 1, steps)  # first change: copies the originals, builds ΔW
        rates = []
        for i in range(2, steps):
            before = weights.stats.bytes_moved
            _sync(device)
            start = time.perf_counter()
            weights.set_position("unet", i, steps)
            _sync(device)
            elapsed = time.perf_counter() - start
            moved = weights.stats.bytes_moved - before
            rates.append(moved / elapsed)
    return statistics.median(rates), moved


def _timed(
    device: str,
    gen: Generation,
    before_step: Callable[[int], None] = lambda i: None,
    *,
    peak: dict[str, int] | None = None,
    label: str = "",
) -> float:
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    gen(before_step)
    _sync(device)
    elapsed = time.perf_counter() - start
    if device == "cuda" and peak is not None:
        peak[label] = max(peak.get(label, 0), torch.cuda.max_memory_allocated())
    return elapsed


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_network(kind: str, unet, gen: Generation, args, device: str, folder: Path) -> tuple[list[dict], dict]:
    """Interleaved runs of no LoRA, static, step, ramp and the reference for one network kind.

    Each kind is its own group: its ratios share the machine's state, and its ΔW cache and CPU
    backups are freed before the next group (together they would not fit in memory).
    """
    model = torch.nn.ModuleDict({"unet": unet})
    layers = write_network(unet, kind, folder / f"{kind}.safetensors")
    network = load_network(folder / f"{kind}.safetensors", name=kind)
    reference_label = "ramp, re-merge from CPU backup (loractl)"
    configs = [
        Config("no LoRA", None, "none"),
        Config("static", kind, "static"),
        Config(f"step {STEP}", kind, "scheduled", STEP),
        *[Config(f"ramp {RAMP} [{m}]", kind, "scheduled", RAMP, m) for m in args.modes.split(",")],
        Config(reference_label, kind, "reference", RAMP),
    ]
    cache = DeltaCache(2**40)  # kept between generations, as a WebUI adapter keeps it
    pool = BufferPool()  # merge buffers reused by the next generation, as the runtime does
    peak: dict[str, int] = {}
    reference = RemergeFromBackup(unet, network, parse_schedule(RAMP))
    extra_memory = {reference_label: sum(b.numel() * b.element_size() for b in reference.backup)}
    holdings: dict[str, dict[str, int]] = {}

    def run(config: Config) -> float:
        if config.kind == "static":  # merged before timing: the host's steady state
            constant = ScheduledNetwork(network, te=Schedule.constant(1.0), unet=Schedule.constant(1.0))
            with ScheduledWeights(model, [constant], EngineSettings(mode="merge"), cache=cache, pool=pool) as weights:
                weights.set_position("unet", 0, args.steps)
                return _timed(device, gen, peak=peak, label=config.label)
        if config.kind == "scheduled":
            scheduled = ScheduledNetwork(network, te=Schedule.constant(1.0), unet=parse_schedule(config.schedule))
            settings = EngineSettings(mode=config.mode, device_budget_mb=args.device_budget_mb)
            with ScheduledWeights(model, [scheduled], settings, cache=cache, pool=pool) as weights:
                held: dict = {}

                def step(i: int) -> None:
                    weights.set_position("unet", i, args.steps)
                    for key, value in weights.memory().items():
                        held[key] = max(held.get(key, 0), value)

                elapsed = _timed(device, gen, step, peak=peak, label=config.label)
                extra_memory[config.label] = sum(held.values())
                holdings[config.label] = {f"{role} on {dev}": v for (role, dev), v in held.items()}
                return elapsed
        if config.kind == "reference":
            try:
                return _timed(device, gen, lambda i: reference.before_step(i, args.steps), peak=peak, label=config.label)
            finally:
                reference.restore()
        return _timed(device, gen, peak=peak, label=config.label)

    print(f"{kind}: {layers} layers", flush=True)
    for config in configs:  # warm-up: fills the ΔW cache, as the second generation finds it
        if config.kind in ("static", "scheduled"):
            run(config)
    times: dict[str, list[float]] = {c.label: [] for c in configs}
    for r in range(args.runs):
        for config in configs:
            times[config.label].append(run(config))
        print(f"  run {r + 1}/{args.runs}: " + ", ".join(f"{v[-1]:.2f}" for v in times.values()), flush=True)
    static = statistics.median(times["static"])
    rows = [
        {
            "network": kind, "layers": layers, "config": c.label,
            "median_s": statistics.median(times[c.label]),
            "spread_s": max(times[c.label]) - min(times[c.label]),
            "vs_static": statistics.median(times[c.label]) / static,
            "extra_memory_mb": extra_memory.get(c.label, 0) / 2**20,
            "holdings_mb": {k: v / 2**20 for k, v in holdings.get(c.label, {}).items()},
            "peak_device_mb": peak[c.label] / 2**20 if c.label in peak else None,
            "peak_over_static_mb": (peak[c.label] - peak["static"]) / 2**20 if c.label in peak and "static" in peak else None,
        }
        for c in configs
    ]
    # The update and the plain copy measured back to back, so both see the same machine state.
    rate, moved = update_bandwidth(unet, network, device, cache)
    copy = copy_bandwidth(device)
    return rows, {"bytes_per_s": rate, "bytes": moved, "copy_bytes_per_s": copy, "times": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--device-budget-mb", type=float, default=0.0, help="the engine's device budget (default 0: lean)")
    parser.add_argument("--size", type=int, help="image size (default: 256 on CPU, 512 on GPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--networks", default="lora,locon,loha")
    parser.add_argument("--modes", default="auto", help="engine modes for the ramp rows, e.g. auto,merge,bypass")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    size = args.size or (512 if device == "cuda" else 256)

    unet = build_unet(device, dtype, args.model)
    gen = Generation(unet, size, args.steps, args.batch, device, dtype)
    folder = Path(tempfile.mkdtemp(prefix="sl-bench-"))
    print(f"{'SDXL' if args.model == 'sdxl' else 'SD 1.5'} UNet, {size}x{size}, batch {args.batch}, {args.steps} steps, {device} {dtype}; "
          f"{args.runs} interleaved runs per network", flush=True)
    rows, details = [], {}
    for kind in args.networks.split(","):
        kind_rows, details[kind] = bench_network(kind, unet, gen, args, device, folder)
        rows += kind_rows
        gc.collect()
        # Each group's results as soon as it ends: a long run that is stopped keeps what it measured.
        print_table(rows, details)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "device": device, "size": size, "steps": args.steps, "batch": args.batch, "runs": args.runs,
                "rows": rows, "details": details,
            }, indent=2))
    return 0


def print_table(rows: list[dict], details: dict) -> None:
    print()
    print("| network | configuration | s / generation (median) | spread | vs static LoRA | engine holds | peak device (over static) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        peak = row.get("peak_device_mb")
        peak_text = f"{peak:.0f} MB ({row['peak_over_static_mb']:+.0f})" if peak is not None else "-"
        print(f"| {row['network']} ({row['layers']} layers) | {row['config']} | {row['median_s']:.2f} | "
              f"{row['spread_s']:.2f} | {row['vs_static']:.3f}x | {row['extra_memory_mb']:.0f} MB | {peak_text} |")
    print()
    for kind, detail in details.items():
        rate, copy_bw = detail["bytes_per_s"], detail["copy_bytes_per_s"]
        print(f"{kind}: a full merged update moves {detail['bytes'] / 2**20:.0f} MB at {rate / 1e9:.2f} GB/s "
              f"= {100 * rate / copy_bw:.0f} % of plain copy bandwidth ({copy_bw / 1e9:.2f} GB/s)")
    print(flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
