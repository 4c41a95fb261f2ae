"""In-host benchmark: scheduled LoRA vs static LoRA vs loractl, through a running WebUI's API.

    WEBUI_PATH=/work/webui python bench/webui_bench.py --url http://127.0.0.1:7861 [--runs 5] [--steps 20]

Cases (each for the LoRA and the LoCon written by webui_networks): no LoRA,
static ``<lora:x:1>`` (the host's builtin), step schedule ``0@0.3:1``, ramp ``0@0,1@1`` (ours),
and loractl's ramp/step (``0@0,1@1`` and ``0@0,0@0.29,1@0.3``) when loractl is installed (our
extension off for those runs via alwayson_scripts, loractl's off for ours). On SD.Next
(``WEBUI_PATH`` an SD.Next checkout) the host's own ``@`` handling replaces loractl: the ramp with
our extension off, which SD.Next evaluates once, at step 0 (it has no per-step path at 058a7f0c).
On Forge main and Forge Neo (the kind read from ``/scheduled-lora/v1/info``) the references are
the host's own static tag, a per-step ``refresh_loras`` port (``--refresh-port``, after linking
``bench/forge_refresh_port`` into the WebUI's extensions/) and Neo's built-in "LoRA Control"
(``<lora:x:[0@0,1@1]>``) when that build has it; the table says whether the server applies LoRAs
baked or on the fly (an "(fp16 LoRA)" storage option at start-up).
Runs are interleaved (round-robin over cases) and the median of ``--runs`` is reported, with
ratios to static. Not a test: prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def post(url, path, payload):
    req = urllib.request.Request(
        url + path, json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=1800) as r:
        return json.loads(r.read())


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=os.environ.get("WEBUI_URL", "http://127.0.0.1:7861"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--refresh-port", action="store_true", help="Forge: also time bench/forge_refresh_port")
    ap.add_argument("--networks", default="sl_lora,sl_locon")
    args = ap.parse_args()
    url = args.url.rstrip("/")
    webui_path = os.environ.get("WEBUI_PATH")
    from webui.server import current_kind

    kind = current_kind()
    if webui_path:
        from support.webui_networks import make_networks_for_webui

        make_networks_for_webui(
            lambda path: get(url, path), lambda path: post(url, path, {}), Path(webui_path) / "models" / "Lora",
            root=webui_path,
        )
    scripts = [s.lower() for s in get(url, "/sdapi/v1/scripts").get("txt2img", [])]
    # Forge loads the checkpoint on the first request; until then /info cannot say how LoRAs apply.
    post(url, "/sdapi/v1/txt2img", dict(prompt="a cat", steps=1, width=64, height=64, save_images=False, send_images=False))
    info = get(url, "/scheduled-lora/v1/info")
    forge = info.get("forge") or None
    have_loractl = "dynamic lora weights" in scripts
    have_port = args.refresh_port and "refresh port" in scripts
    have_neo_control = "lora control integrated" in scripts
    if args.refresh_port and not have_port:
        sys.exit("--refresh-port: link bench/forge_refresh_port into the WebUI's extensions/ and restart it")
    ours_on = {"scheduled lora": {"args": [True]}}
    ours_off = {"scheduled lora": {"args": [False]}}
    if have_loractl:
        ours_on["dynamic lora weights"] = {"args": [False, False]}
        ours_off["dynamic lora weights"] = {"args": [True, False]}
    cases = [("no LoRA", "", "-", ours_on)]
    for net in args.networks.split(","):
        cases += [
            ("static", f"<lora:{net}:1>", net, ours_on),
            ("step 0@0.3:1", f"<lora:{net}:0@0.3:1>", net, ours_on),
            ("ramp 0@0,1@1", f"<lora:{net}:0@0,1@1>", net, ours_on),
        ]
        if have_loractl:
            cases += [
                ("loractl step", f"<lora:{net}:0@0,0@0.29,1@0.3>", net, ours_off),
                ("loractl ramp", f"<lora:{net}:0@0,1@1>", net, ours_off),
            ]
        if kind == "sdnext":
            cases += [("SD.Next's own ramp (ours off)", f"<lora:{net}:0@0,1@1>", net, ours_off)]
        if have_port:
            cases += [
                ("refresh port step", "", net, dict(ours_on, **{"refresh port": {"args": [net, "step"]}})),
                ("refresh port ramp", "", net, dict(ours_on, **{"refresh port": {"args": [net, "ramp"]}})),
            ]
        if have_neo_control:
            cases += [("Neo LoRA Control ramp", f"<lora:{net}:[0@0,1@1]>", net, ours_on)]
    if forge is not None:
        mode = "on the fly" if forge["on_the_fly"]["unet"] else "baked"
        print(f"Forge ({forge['layout']}), {forge['family']}, LoRAs {mode}; Neo LoRA Control: {have_neo_control}")
    times: dict[tuple[str, str], list[float]] = {}
    base = dict(
        negative_prompt="",
        seed=1,
        steps=args.steps,
        width=args.size,
        height=args.size,
        sampler_name="Euler",
        save_images=False,
        send_images=False,
    )
    for _label, tag, _net, scripts_args in cases:  # warm-up
        post(
            url,
            "/sdapi/v1/txt2img",
            dict(base, prompt=f"a cat {tag}", alwayson_scripts=scripts_args),  # loractl divides by zero at 2 steps
        )
    for _ in range(args.runs):
        for label, tag, net, scripts_args in cases:
            start = time.perf_counter()
            post(url, "/sdapi/v1/txt2img", dict(base, prompt=f"a cat {tag}", alwayson_scripts=scripts_args))
            times.setdefault((net, label), []).append(time.perf_counter() - start)
    print(f"| network | case | median s ({args.runs} runs, {args.steps} steps, {args.size}px) | × static |")
    print("| --- | --- | --- | --- |")
    for (net, label), values in times.items():
        med = statistics.median(values)
        static = times.get((net, "static"))
        ratio = f"{med / statistics.median(static):.3f}" if static else "-"
        print(f"| {net} | {label} | {med:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
