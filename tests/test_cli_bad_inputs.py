"""A catalogue of bad input, run through the real command line (``python -m lib_scheduled_lora``
in a subprocess): every case must exit with code 2, print no traceback, print exactly one
``error: ...`` line of at most 300 characters on stderr that names what is wrong (the fragment
given per case), and leave every file it was given or asked to write as it was.

Classes (the issue's): numbers and weights (non-finite strengths and options, options out of
range, networks holding NaN/inf, networks that do not fit the model), files and paths (corrupt,
truncated, pickled, FIFO and device files, output paths that cannot be written, overlong names),
tags (syntax, LoRA Block Weight arguments, names reaching out of the network folder, overlong
tags) and the demo model's fixed size. Interruptions, full disks and closed pipes have their own
tests in test_cli_interruptions.py.

The model is the built-in demo model (loads in a second) and a tiny SD 1.x single-file checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors.torch import load_file, save_file  # noqa: E402
from support.random_networks import Layer, random_network, write  # noqa: E402
from support.sd_layouts import kohya_lora_state, tiny_sd  # noqa: E402

from lib_scheduled_lora.core.staging import staging_owner  # noqa: E402
from lib_scheduled_lora.demo import model as demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_LINE = 300
LONG = 10_000
KEYS = LONG // 6  # keyframes in an overlong tag


def run_cli(*argv: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lib_scheduled_lora", *argv],
        capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=timeout,
    )


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry below ``folder`` (hidden ones too) with its size, mode and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        out[str(path.relative_to(folder))] = (info.st_size, info.st_mode, info.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Models, networks good and bad, and an output folder with files in it."""
    root = tmp_path_factory.mktemp("bad-inputs")
    loras = root / "loras"
    loras.mkdir()
    good = demo.network_path("wday")
    state = load_file(good)

    nan = dict(state)
    key = sorted(k for k in nan if k.endswith("lora_up.weight"))[3]
    nan[key] = nan[key].clone()
    nan[key].view(-1)[5] = float("nan")
    save_file(nan, loras / "nanvalues.safetensors")

    inf_alpha = dict(state)
    alpha_key = sorted(k for k in inf_alpha if k.endswith(".alpha"))[0]
    inf_alpha[alpha_key] = torch.tensor(float("inf"))
    save_file(inf_alpha, loras / "infalpha.safetensors")

    save_file(
        kohya_lora_state(tiny_sd("sdxl"), select=lambda k: "input_blocks_4_1_transformer_blocks_1" in k),
        loras / "sdxl.safetensors",
    )
    # the demo's attention layers by name, with twice the width: "layers of the wrong width"
    unet = demo.load_demo_pipeline().unet
    wide = [
        Layer("lora_unet_" + name.replace(".", "_"), (module.out_features * 2, module.in_features * 2))
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and ".attn1.to_q" in name
    ]
    write(random_network(wide, "lora", rank=2), loras / "wide.safetensors")
    save_file({"foo": torch.zeros(3)}, loras / "notanetwork.safetensors")
    data = good.read_bytes()
    (loras / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (loras / "pickled.pt").write_bytes(b"\x80\x04\x95 not unpickled, only named .pt")
    os.mkfifo(root / "fifo.safetensors")
    (loras / "wday.safetensors").write_bytes(data)

    checkpoint = root / "sd1.safetensors"
    save_file(tiny_sd("sd1").ldm_state_dict(), checkpoint)
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    model_copy = root / "demo_copy"
    model_copy.mkdir()
    for name in ("config.json", "tokenizer.json", "unet.safetensors", "text_encoder.safetensors"):
        (model_copy / name).write_bytes((demo.WEIGHTS_DIR / name).read_bytes())

    out = root / "out"
    out.mkdir()
    (out / "existing.safetensors").write_bytes(b"keep me")
    (out / "existing.png").write_bytes(b"keep me too")
    (out / "a_file").write_bytes(b"a file, not a folder")
    return root


LORA = "{root}/loras"

# (id, argv, fragment the error line must hold). "{root}" is the world's folder.
CASES = [
    # -- numbers and weights ------------------------------------------------------------------------
    ("merge-strength-nan", ["merge", "{root}/sd1.safetensors", "--lora", "{root}/loras/wday.safetensors:nan", "-o", "{root}/out/m.safetensors"], "'nan' after ':' is not a finite number"),
    ("merge-strength-inf", ["merge", "demo", "--lora", "wday:inf", "-o", "{root}/out/m"], "'inf' after ':' is not a finite number"),
    ("merge-strength-minus-inf", ["merge", "demo", "--lora", "wday:-inf", "-o", "{root}/out/m"], "'-inf' after ':' is not a finite number"),
    ("merge-strength-overflow", ["merge", "demo", "--lora", "wday:1e999", "-o", "{root}/out/m"], "'1e999' after ':' is not a finite number"),
    ("merge-strength-underscore", ["merge", "demo", "--lora", "{root}/loras/wday.safetensors:1_0", "-o", "{root}/out/m"], "'1_0' after ':' is not a number"),
    ("generate-cfg-nan", ["generate", "a wday", "--cfg", "nan", "-o", "{root}/out/g.png"], "argument --cfg: 'nan' is not a finite number"),
    ("generate-cfg-inf", ["generate", "a wday", "--cfg", "inf", "-o", "{root}/out/g.png"], "argument --cfg: 'inf' is not a finite number"),
    ("generate-cfg-negative", ["generate", "a wday", "--cfg", "-3", "-o", "{root}/out/g.png"], "argument --cfg: '-3' is out of range (0 to 100)"),
    ("generate-steps-0", ["generate", "a wday", "--steps", "0", "-o", "{root}/out/g.png"], "argument --steps: 0 is out of range (1 to 1000)"),
    ("generate-steps-negative", ["generate", "a wday", "--steps", "-5", "-o", "{root}/out/g.png"], "argument --steps: -5 is out of range"),
    ("generate-steps-fraction", ["generate", "a wday", "--steps", "2.5", "-o", "{root}/out/g.png"], "'2.5' is not a whole number"),
    ("generate-steps-word", ["generate", "a wday", "--steps", "twenty", "-o", "{root}/out/g.png"], "'twenty' is not a number"),
    ("generate-seed-2-70", ["generate", "a wday", "--seed", str(2**70), "-o", "{root}/out/g.png"], f"argument --seed: {2**70} is out of range (0 to {2**64 - 1})"),
    ("generate-seed-negative", ["generate", "a wday", "--seed", "-1", "-o", "{root}/out/g.png"], "argument --seed: -1 is out of range"),
    ("generate-width-0", ["generate", "a wday", "--width", "0", "-o", "{root}/out/g.png"], "argument --width: 0 is out of range (8 to 8192)"),
    ("generate-width-negative", ["generate", "a wday", "--width", "-32", "-o", "{root}/out/g.png"], "argument --width: -32 is out of range"),
    ("generate-width-33", ["generate", "a wday", "--width", "33", "-o", "{root}/out/g.png"], "argument --width: 33 is not a multiple of 8"),
    ("generate-demo-size", ["generate", "a wday", "--height", "64", "-o", "{root}/out/g.png"], "--height: the demo model draws 32x32 images only (got 64)"),
    ("generate-sd-too-small", ["generate", "a cat", "--model", "{root}/sd1.safetensors", "--width", "16", "-o", "{root}/out/g.png"], "--width: 16 is too small for a Stable Diffusion model"),
    ("demo-seeds-0", ["demo", "--seeds", "0", "--out", "{root}/out/d.png"], "argument --seeds: 0 is out of range (1 to 64)"),
    ("demo-scale-0", ["demo", "--scale", "0", "--out", "{root}/out/d.png"], "argument --scale: 0 is out of range (1 to 32)"),
    ("demo-steps-nan", ["demo", "--steps", "nan", "--out", "{root}/out/d.png"], "argument --steps: 'nan' is not a finite number"),
    ("demo-seed-range-overflows", ["demo", "--seed", str(2**64 - 1), "--seeds", "2", "--out", "{root}/out/d.png"], "goes past the largest seed"),
    ("demo-network-unknown", ["demo", "--network", "nobody", "--out", "{root}/out/d.png"], "argument --network: invalid choice: 'nobody'"),
    ("schedule-steps-huge", ["schedule", "<lora:x:0@0.3:1>", "--steps", "1000000000000"], "argument --steps: 1000000000000 is out of range (1 to 1000)"),
    ("schedule-hr-steps-inf", ["schedule", "0@0.3:1", "--hr-steps", "inf"], "argument --hr-steps: 'inf' is not a finite number"),
    ("merge-nan-tensors", ["merge", "demo", "--lora", "{root}/loras/nanvalues.safetensors", "-o", "{root}/out/m"], "nanvalues.safetensors: 1 tensor(s) hold NaN or infinite values (first: lora_unet_"),
    ("merge-inf-alpha", ["merge", "demo", "--lora", "{root}/loras/infalpha.safetensors", "-o", "{root}/out/m"], "infalpha.safetensors: 1 tensor(s) hold NaN or infinite values (first: lora_"),
    ("generate-nan-tensors", ["generate", "a <lora:nanvalues:1>", "--lora-dir", LORA, "-o", "{root}/out/g.png"], "nanvalues.safetensors: 1 tensor(s) hold NaN or infinite values"),
    ("generate-inf-alpha", ["generate", "a <lora:infalpha:0@0.5:1>", "--lora-dir", LORA, "-o", "{root}/out/g.png"], "infalpha.safetensors: 1 tensor(s) hold NaN or infinite values"),
    ("generate-sdxl-on-sd1", ["generate", "a <lora:sdxl:1>", "--model", "demo", "--lora-dir", LORA, "-o", "{root}/out/g.png"], "does not fit this SD 1.x model: the network is for SDXL"),
    ("merge-sdxl-on-sd1", ["merge", "demo", "--lora", "{root}/loras/sdxl.safetensors", "-o", "{root}/out/m"], "does not fit this SD 1.x model: the network is for SDXL"),
    ("generate-wrong-width", ["generate", "a <lora:wide:1>", "--lora-dir", LORA, "-o", "{root}/out/g.png"], "layer(s) have the wrong size for this SD 1.x model (first: lora_unet_"),
    ("merge-wrong-width", ["merge", "demo", "--lora", "{root}/loras/wide.safetensors", "-o", "{root}/out/m"], "layer(s) have the wrong size for this SD 1.x model (first: lora_unet_"),
    # -- files ------------------------------------------------------------------------------------------
    ("inspect-fifo", ["inspect", "{root}/fifo.safetensors"], "fifo.safetensors: is a FIFO (named pipe)"),
    ("inspect-device", ["inspect", "/dev/zero"], "/dev/zero: is a character device"),
    ("inspect-folder", ["inspect", "{root}/loras"], "is a directory"),
    ("inspect-missing", ["inspect", "{root}/nothing.safetensors"], "nothing.safetensors: file not found"),
    ("inspect-truncated", ["inspect", "{root}/loras/truncated.safetensors"], "truncated"),
    ("inspect-pickle", ["inspect", "{root}/loras/pickled.pt"], "pickle-based files can run arbitrary code"),
    ("inspect-not-a-network", ["inspect", "{root}/loras/notanetwork.safetensors"], "no LoRA/LyCORIS keys found"),
    ("inspect-long-path", ["inspect", "{root}/" + "d" * LONG + ".safetensors"], "cannot read: File name too long"),
    ("merge-truncated-network", ["merge", "demo", "--lora", "{root}/loras/truncated.safetensors", "-o", "{root}/out/m"], "truncated.safetensors: truncated"),
    ("merge-fifo-network", ["merge", "demo", "--lora", "{root}/fifo.safetensors", "-o", "{root}/out/m"], "is a FIFO"),
    ("merge-corrupt-model", ["merge", "{root}/corrupt.safetensors", "--lora", "{root}/loras/wday.safetensors", "-o", "{root}/out/m.safetensors"], "corrupt.safetensors: corrupt safetensors header"),
    ("merge-missing-model", ["merge", "{root}/nomodel.safetensors", "--lora", "{root}/loras/wday.safetensors", "-o", "{root}/out/m.safetensors"], "nomodel.safetensors: not found"),
    ("generate-corrupt-model", ["generate", "a cat", "--model", "{root}/corrupt.safetensors", "-o", "{root}/out/g.png"], "corrupt.safetensors: corrupt safetensors header"),
    ("generate-network-as-model", ["generate", "a cat", "--model", "{root}/loras/wday.safetensors", "-o", "{root}/out/g.png"], "not a Stable Diffusion checkpoint"),
    ("generate-missing-model", ["generate", "a cat", "--model", "{root}/nomodel", "-o", "{root}/out/g.png"], "no such diffusers folder"),
    ("generate-fifo-model", ["generate", "a cat", "--model", "{root}/fifo.safetensors", "-o", "{root}/out/g.png"], "is a FIFO"),
    ("generate-missing-lora-dir", ["generate", "a <lora:wday:1>", "--lora-dir", "{root}/nothere", "-o", "{root}/out/g.png"], "--lora-dir:"),
    # -- output paths ---------------------------------------------------------------------------------
    ("generate-output-under-a-file", ["generate", "a wday", "-o", "{root}/out/a_file/x.png"], "a_file is not a folder"),
    ("demo-output-under-a-file", ["demo", "--out", "{root}/out/a_file/x.png"], "a_file is not a folder"),
    ("generate-output-is-a-folder", ["generate", "a wday", "-o", "{root}/out"], "is a folder; give a file name"),
    ("generate-output-name-too-long", ["generate", "a wday", "-o", "{root}/out/" + "n" * LONG + ".png"], "bytes long; this file system allows"),
    ("demo-output-name-too-long", ["demo", "--out", "{root}/out/" + "n" * 250 + ".png"], "file name too long"),
    ("generate-output-empty", ["generate", "a wday", "-o", ""], "argument -o/--output: an empty path"),
    ("inspect-empty", ["inspect", ""], "argument file: an empty path"),
    ("merge-model-empty", ["merge", "", "--lora", "wday", "-o", "{root}/out/m"], "argument MODEL: an empty path"),
    ("merge-output-exists", ["merge", "{root}/sd1.safetensors", "--lora", "{root}/loras/wday.safetensors", "-o", "{root}/out/existing.safetensors"], "existing.safetensors: already exists; refusing to overwrite it"),
    ("merge-output-inside-model", ["merge", "{root}/demo_copy", "--lora", "{root}/loras/wday.safetensors", "-o", "{root}/demo_copy/merged"], "is inside the model folder"),
    ("merge-output-missing-folder", ["merge", "demo", "--lora", "wday", "-o", "{root}/out/no/such/m"], "does not exist"),
    ("merge-output-under-a-file", ["merge", "demo", "--lora", "wday", "-o", "{root}/out/a_file/m"], "a_file is not a folder"),
    # -- tags -----------------------------------------------------------------------------------------
    ("generate-tag-syntax", ["generate", "a <lora:wday:0@0.3:abc>", "-o", "{root}/out/g.png"], "<lora:wday:0@0.3:abc>: 'abc' at column 18 is not a number"),
    ("generate-tag-nan", ["generate", "a <lora:wday:0@0.3:nan>", "-o", "{root}/out/g.png"], "'nan' at column 18 is not a finite number"),
    ("generate-lbw-scheduled", ["generate", "a <lora:wday:0@0.3:1:lbw=1,0,0>", "-o", "{root}/out/g.png"], "'lbw=1,0,0' at column 20 is a LoRA Block Weight argument"),
    ("generate-lbw-constant", ["generate", "a <lora:wday:1:lbw=ALL>", "-o", "{root}/out/g.png"], "is a LoRA Block Weight argument"),
    ("generate-start", ["generate", "a <lora:wday:1:start=5>", "-o", "{root}/out/g.png"], "start=N is 0@N:1"),
    ("generate-name-escapes-folder", ["generate", "a <lora:../../../etc/passwd:1>", "--lora-dir", LORA, "-o", "{root}/out/g.png"], "no network named '../../../etc/passwd'"),
    ("generate-missing-network", ["generate", "a <lora:nobody:1>", "-o", "{root}/out/g.png"], "no network named 'nobody'"),
    ("generate-pickled-network", ["generate", "a <lora:pickled:1>", "--lora-dir", LORA, "-o", "{root}/out/g.png"], "no network named 'pickled'"),
    ("generate-long-tag", ["generate", "a <lora:wday:" + "1@0.5," * KEYS + "x@1>", "-o", "{root}/out/g.png"], f"'x' at column {11 + 6 * KEYS + 1} is not a number"),
    ("generate-long-name", ["generate", "a <lora:" + "w" * LONG + ":1>", "-o", "{root}/out/g.png"], "no network named"),
    ("schedule-long-text", ["schedule", "0@0.3:" + "2@0.5," * KEYS + "y"], f"'y' at column {6 + 6 * KEYS + 1} is not a number"),
    ("demo-bad-schedule", ["demo", "--schedule", "1", "--schedule", "0@0.3:z", "--out", "{root}/out/d.png"], "'z' at column 24 is not a number"),
    ("demo-tag-in-prompt", ["demo", "--prompt", "a <lora:nobody:1>", "--out", "{root}/out/d.png"], "no network named 'nobody'"),
    # -- the command line itself ------------------------------------------------------------------
    ("unknown-command", ["paint"], "invalid choice: 'paint'"),
    ("unknown-option", ["schedule", "0@0.3:1", "--stepz", "3"], "unrecognized arguments: --stepz 3"),
    ("missing-argument", ["merge", "demo", "-o", "{root}/out/m"], "the following arguments are required: --lora"),
    ("unknown-sampler", ["generate", "a wday", "--sampler", "x" * LONG], "argument --sampler: invalid choice"),
]


@pytest.mark.parametrize("argv, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, argv, fragment):
    before = snapshot(world)
    result = run_cli(*(a.replace("{root}", str(world)) for a in argv))
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and len(lines[0]) <= MAX_LINE, lines[0]
    assert fragment.replace("{root}", str(world)) in lines[0], lines[0]
    assert snapshot(world) == before
    assert not any(staging_owner(p.name) for p in world.rglob("*"))


def test_every_class_of_the_issue_is_in_the_catalogue():
    """The catalogue covers each command and each class named in the issue."""
    ids = {c[0] for c in CASES}
    commands = {c[1][0] for c in CASES}
    assert {"inspect", "merge", "generate", "schedule", "demo"} <= commands
    for needed in (
        "merge-strength-nan", "generate-cfg-nan", "generate-steps-0", "generate-seed-2-70", "generate-width-33",
        "demo-seeds-0", "demo-scale-0", "schedule-steps-huge", "merge-nan-tensors", "generate-inf-alpha",
        "generate-sdxl-on-sd1", "generate-wrong-width", "demo-output-under-a-file", "generate-output-under-a-file",
        "generate-output-name-too-long", "inspect-fifo", "generate-corrupt-model", "generate-long-tag",
        "generate-lbw-scheduled",
    ):
        assert needed in ids, needed


def test_a_corrupt_model_does_not_suggest_config(world):
    result = run_cli("generate", "a cat", "--model", str(world / "corrupt.safetensors"), "-o", str(world / "out/g.png"))
    assert result.returncode == 2 and "--config" not in result.stderr


def test_inspect_flags_nan_and_inf_and_still_describes_the_file(world):
    for name, key_end in (("nanvalues", "lora_up.weight"), ("infalpha", ".alpha")):
        result = run_cli("inspect", str(world / "loras" / f"{name}.safetensors"))
        assert result.returncode == 0, result.stderr
        assert "NaN or infinite values in 1 tensor(s) (merge and generate refuse this file):" in result.stdout
        flagged = result.stdout.split("refuse this file):")[1].splitlines()[1].strip()
        assert flagged.endswith(key_end), flagged
        assert result.stderr.startswith("warning: ") and "merge and generate refuse this file" in result.stderr
    clean = run_cli("inspect", str(demo.network_path("wday")))
    assert "values: all finite" in clean.stdout and clean.stderr == ""


def test_a_network_partly_matching_is_applied_with_a_warning_in_both_commands(world, tmp_path):
    """Only a network that cannot apply at all is refused; one with a few stray layers is merged
    and generated with a warning naming the count and the first one (merge --strict refuses)."""
    state = load_file(demo.network_path("wday"))
    state["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 8)
    state["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 2)
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(state, loras / "stray.safetensors")
    merged = run_cli("merge", "demo", "--lora", str(loras / "stray.safetensors"), "-o", str(tmp_path / "m"))
    assert merged.returncode == 0, merged.stderr
    assert "1 layer(s) match nothing in the model (first: lora_unet_not_a_layer" in merged.stderr
    strict = run_cli("merge", "demo", "--lora", str(loras / "stray.safetensors"), "-o", str(tmp_path / "m2"), "--strict")
    assert strict.returncode == 2 and "--strict refuses" in strict.stderr
    assert not (tmp_path / "m2").exists()
