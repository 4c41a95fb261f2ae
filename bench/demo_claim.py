"""Measure the claim behind scheduled LoRA on the built-in demo model.

    python bench/demo_claim.py --seeds 16            # ~10 min on one CPU thread
    python bench/demo_claim.py --seeds 4 --quick     # smoke run
    # or in parallel, one network type per process, then the table and plot:
    python bench/demo_claim.py --seeds 16 --networks LoRA   (LoCon, LoHa likewise)
    python bench/demo_claim.py --combine

For every shipped wday network (LoRA, LoCon, LoHa) and every setting -- the base model,
constant strengths 0.25 ... 5, steps "0 until T, then 1" for T = 0.1 ... 0.7, ramps, a stronger
late step, and the reverse (network early only) -- it generates "a white wday" and "a red wday"
(outside the network's training bias: the wday was always black) over ``--seeds`` seeds each,
with 20 DDIM steps and guidance 3, and measures per image (``lib_scheduled_lora.demo.metrics``):

* ``colour``: attribute fidelity, 1 - RGB distance to the requested colour / sqrt(3);
* ``hit``: the subject's nearest palette colour is the requested one;
* ``wday``: concept fidelity, checker-texture strength (1 = as trained);
* ``both``: hit and wday >= 0.2 (ten times the base model's level) -- the concept's texture
  in the requested colour.

Writes ``bench/results/demo_claim.{md,json,png}``: the table (mean, and the 95 % interval half
width of the mean over images), and a scatter plot of concept fidelity against colour hit rate, one point
per setting, one panel per network type.
Settings: base; constant 0.25, 0.5, 1, 1.5, 2, 3, 5; steps 0@T:1 for T = 0.1, 0.2, 0.3, 0.5, 0.7;
0@0.3:2, 0@0.3:3, 0@0.3:5; ramps 0@0,1@1 and 0@0,2@1; reverse 1@0.3:0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NETWORKS = (("LoRA", "wday"), ("LoCon", "wday_locon"), ("LoHa", "wday_loha"))
COLOURS = ("white", "red")


def settings(quick: bool = False) -> list[tuple[str, str, str | None]]:
    """(family, label, schedule) -- schedule None is the base model."""
    out = [("base", "base", None)]
    constants = (0.5, 1, 2) if quick else (0.25, 0.5, 1, 1.5, 2, 3, 5)
    out += [("constant", f"{v:g}", f"{v:g}") for v in constants]
    switches = (0.3,) if quick else (0.1, 0.2, 0.3, 0.5, 0.7)
    out += [("step", f"0@{t:g}:1", f"0@{t:g}:1") for t in switches]
    if not quick:
        out += [("step", f"0@0.3:{v}", f"0@0.3:{v}") for v in (2, 3, 5)]
        out += [("ramp", s, s) for s in ("0@0,1@1", "0@0,2@1")]
        out += [("reverse", "1@0.3:0", "1@0.3:0")]
    return out


def _ci(values: np.ndarray) -> float:
    return float(1.96 * values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def measure(args) -> list[dict]:
    import torch

    from lib_scheduled_lora.core.engine import EngineSettings
    from lib_scheduled_lora.core.library import NetworkLibrary
    from lib_scheduled_lora.demo import metrics
    from lib_scheduled_lora.demo import model as demo
    from lib_scheduled_lora.hosts.diffusers import attach
    from lib_scheduled_lora.hosts.runner import scheduled_networks

    torch.set_num_threads(args.threads)
    pipe = demo.load_demo_pipeline("cpu")
    library = NetworkLibrary.scan([demo.NETWORKS_DIR])
    jobs = [(c, s) for c in COLOURS for s in range(args.seeds)]
    prompts = [f"a {c} wday" for c, _ in jobs]
    rows = []
    base_row = None
    for net_label, net_name in NETWORKS:
        if args.networks and net_label not in args.networks:
            continue
        for family, label, schedule in settings(args.quick):
            if args.only and label not in args.only:
                continue
            if schedule is None and base_row is not None:
                rows.append({**base_row, "network": net_label})
                continue
            tag = f"<lora:{net_name}:{schedule}>" if schedule is not None else ""
            start = time.perf_counter()
            gens = [torch.Generator().manual_seed(1000 + s) for _, s in jobs]
            with attach(pipe, scheduled_networks(tag, library), EngineSettings()):
                images = pipe(
                    prompts, num_inference_steps=args.steps, guidance_scale=args.cfg, generator=gens
                ).images
            m = {"colour": [], "hit": [], "wday": []}
            for (colour, _), image in zip(jobs, images):
                m["colour"].append(metrics.attribute_fidelity(image, colour))
                m["hit"].append(float(metrics.colour_hit(image, colour)))
                m["wday"].append(metrics.concept_fidelity(image))
            arrays = {k: np.array(v) for k, v in m.items()}
            arrays["both"] = ((arrays["hit"] > 0.5) & (arrays["wday"] >= metrics.CHECKER_SEEN)).astype(float)
            row = {
                "network": net_label,
                "family": family,
                "setting": label,
                "tag": tag or "(none)",
                "n": len(jobs),
                "seconds": round(time.perf_counter() - start, 2),
            }
            for k, v in arrays.items():
                row[k], row[k + "_ci"], row[k + "_sd"] = float(v.mean()), _ci(v), float(v.std(ddof=1))
            row["per_image"] = {k: [round(float(x), 4) for x in v] for k, v in arrays.items()}
            rows.append(row)
            if schedule is None:
                base_row = row
            print(
                f"{net_label:6} {label:12} colour {row['colour']:.3f}±{row['colour_ci']:.3f} "
                f"hit {row['hit']:.2f} wday {row['wday']:.3f}±{row['wday_ci']:.3f} both {row['both']:.2f} "
                f"({row['seconds']}s)",
                flush=True,
            )
    return rows


def table(rows: list[dict], args) -> str:
    lines = [
        f'Prompts "a white wday" and "a red wday", {args.seeds} seeds each (n = {2 * args.seeds} per cell), '
        f"{args.steps} DDIM steps, cfg {args.cfg:g}. Mean ± 95 % interval half-width of the mean.",
        "",
        "| network | setting | colour fidelity | colour hit | concept (wday) fidelity | both |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | `{r['setting']}` | {r['colour']:.3f} ± {r['colour_ci']:.3f} | "
            f"{r['hit']:.2f} | {r['wday']:.3f} ± {r['wday_ci']:.3f} | {r['both']:.2f} |"
        )
    return "\n".join(lines) + "\n"


STYLE = {
    "base": ((0, 0, 0), "s"),
    "constant": ((31, 119, 180), "o"),
    "step": ((230, 110, 0), "^"),
    "ramp": ((44, 160, 44), "d"),
    "reverse": ((140, 140, 140), "x"),
}


def plot(rows: list[dict], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    panel, margin = 360, 46
    nets = [n for n, _ in NETWORKS]
    img = Image.new("RGB", (len(nets) * (panel + margin) + margin, panel + 2 * margin + 30), "white")
    d = ImageDraw.Draw(img)
    ys = [r["wday"] for r in rows]
    x0, x1 = -0.05, 1.05
    y0, y1 = min(0.0, min(ys) - 0.05), max(ys) + 0.08
    for i, net in enumerate(nets):
        ox, oy = margin + i * (panel + margin), margin
        d.rectangle([ox, oy, ox + panel, oy + panel], outline="black")
        d.text((ox + panel // 2 - 20, oy - 16), net, fill="black", font=font)
        for k in range(6):
            fx, fy = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
            px, py = ox + panel * k / 5, oy + panel - panel * k / 5
            d.line([px, oy + panel, px, oy + panel + 4], fill="black")
            d.text((px - 10, oy + panel + 6), f"{fx:.2f}", fill="black", font=font)
            d.line([ox - 4, py, ox, py], fill="black")
            d.text((ox - 32, py - 6), f"{fy:.2f}", fill="black", font=font)
        d.text(
            (ox + panel // 2 - 80, oy + panel + 20),
            "colour hit rate (white/red asked) ->",
            fill="black",
            font=font,
        )

        def to_px(x, y, ox=ox, oy=oy):
            return ox + (x - x0) / (x1 - x0) * panel, oy + panel - (y - y0) / (y1 - y0) * panel

        for r in (r for r in rows if r["network"] == net):
            colour, marker = STYLE[r["family"]]
            cx, cy = to_px(r["hit"], r["wday"])
            ex = r["hit_ci"] / (x1 - x0) * panel
            ey = r["wday_ci"] / (y1 - y0) * panel
            d.line([cx - ex, cy, cx + ex, cy], fill=(200, 200, 200))
            d.line([cx, cy - ey, cx, cy + ey], fill=(200, 200, 200))
            s = 4
            if marker == "o":
                d.ellipse([cx - s, cy - s, cx + s, cy + s], fill=colour)
            elif marker == "s":
                d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
            elif marker == "^":
                d.polygon([(cx, cy - s - 1), (cx - s, cy + s), (cx + s, cy + s)], fill=colour)
            elif marker == "d":
                d.polygon(
                    [(cx, cy - s - 1), (cx - s - 1, cy), (cx, cy + s + 1), (cx + s + 1, cy)], fill=colour
                )
            else:
                d.line([cx - s, cy - s, cx + s, cy + s], fill=colour, width=2)
                d.line([cx - s, cy + s, cx + s, cy - s], fill=colour, width=2)
            d.text((cx + 5, cy - 5), r["setting"], fill=colour, font=font)
    d.text((4, 4), "concept (wday) fidelity ^", fill="black", font=font)
    lx = margin
    for family, (colour, _) in STYLE.items():
        d.rectangle([lx, img.height - 16, lx + 8, img.height - 8], fill=colour)
        d.text((lx + 12, img.height - 18), family, fill="black", font=font)
        lx += 90
    img.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=16, help="seeds per prompt (default: 16)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a handful of settings only")
    parser.add_argument(
        "--networks",
        nargs="*",
        choices=[n for n, _ in NETWORKS],
        help="measure only these (their rows are kept in PART files, see --combine)",
    )
    parser.add_argument(
        "--only", nargs="*", help="only these setting labels (merged into existing PART files)"
    )
    parser.add_argument(
        "--combine",
        action="store_true",
        help="no generation: build the table and plot from the PART files of earlier --networks runs",
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "bench" / "results" / "demo_claim"),
        help="output path stem (default: bench/results/demo_claim)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.combine:
        rows = []
        for net_label, _ in NETWORKS:
            part = out.parent / f"{out.name}.{net_label}.part.json"
            if part.is_file():
                data = json.loads(part.read_text())
                rows += data["rows"]
                args.seeds, args.steps, args.cfg = (
                    data["args"]["seeds"],
                    data["args"]["steps"],
                    data["args"]["cfg"],
                )
    else:
        rows = measure(args)
    if args.networks:
        for net in args.networks:
            part = out.parent / f"{out.name}.{net}.part.json"
            new = [r for r in rows if r["network"] == net]
            if args.only and part.is_file():  # add to / replace in an earlier run's rows
                done = {r["setting"] for r in new}
                old = [r for r in json.loads(part.read_text())["rows"] if r["setting"] not in done]
                order = [label for _, label, _ in settings(args.quick)]
                new = sorted(
                    old + new, key=lambda r: order.index(r["setting"]) if r["setting"] in order else 99
                )
            part.write_text(json.dumps({"args": {**vars(args), "only": None}, "rows": new}, indent=1))
        print(f"wrote the PART files of {', '.join(args.networks)}; run --combine when all are there")
        return 0
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    md = table(rows, args)
    out.with_suffix(".md").write_text(md)
    plot(rows, out.with_suffix(".png"))
    print(md)
    print(f"wrote {out}.md, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
