"""Interrupted and failing writes through the real command line (subprocesses): SIGTERM and
Ctrl-C mid-merge end in one line and leave nothing; SIGKILL leaves a recognisable staging entry
that the next run removes; a full disk (a real tmpfs when the tests run as root, else a failing
write) ends in one line with nothing left; a closed pipe ends quietly; the umask is respected.

To interrupt a merge at a known point, the subprocess runs the real ``cli.main`` with one
function of the merge slowed down (it writes a "ready" file, then sleeps): the signal arrives
while the merge's staging folder or file exists.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from lib_scheduled_lora.cli import main  # noqa: E402
from lib_scheduled_lora.core.staging import staging_owner  # noqa: E402
from lib_scheduled_lora.demo import model as demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# Runs `python -m lib_scheduled_lora ARGS` with the merge paused at STAGE ("plan": while applying
# the networks, the staging folder of a folder merge exists; "save": while a staging file is being
# written, after some bytes).
SLOWED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    ready, stage, *argv = sys.argv[1:]
    if stage == "plan":
        import lib_scheduled_lora.core.merge as merge
        real = merge.merged_weight
        def slow(*args, **kwargs):
            Path(ready).write_text("ready")
            time.sleep(120)
            return real(*args, **kwargs)
        merge.merged_weight = slow
    else:
        from lib_scheduled_lora.core.safetensors_stream import StreamingWriter
        real_write = StreamingWriter.write
        def slow_write(self, name, tensor):
            real_write(self, name, tensor)  # some bytes of the staged file are on disk
            self._file.flush()
            Path(ready).write_text("ready")
            time.sleep(120)
        StreamingWriter.write = slow_write
    from lib_scheduled_lora.cli import main
    raise SystemExit(main(argv))
    """
)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_slowed(tmp_path: Path, stage: str, *argv: str) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOWED, str(ready), stage, *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
        # A suite started in the background (``cmd &``) passes SIGINT on as ignored, and Python then
        # keeps it ignored: give the child the terminal's default, as a user's Ctrl-C finds it.
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the merge never got going: {process.communicate()}")
        time.sleep(0.05)
    return process, ready


def _staging(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if staging_owner(p.name)]


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lib_scheduled_lora", *argv], capture_output=True, text=True, env=ENV, cwd=ROOT,
        timeout=300, **kwargs,
    )


@pytest.mark.parametrize(
    "stage, output, sig, code, words",
    [
        ("plan", "merged", signal.SIGTERM, 143, "terminated (SIGTERM)"),
        ("plan", "merged", signal.SIGINT, 130, "interrupted (Ctrl-C)"),
        ("save", "merged", signal.SIGTERM, 143, "terminated (SIGTERM)"),
    ],
    ids=["sigterm-folder", "ctrl-c-folder", "sigterm-writing-a-file"],
)
def test_a_signal_mid_merge_ends_in_one_line_and_leaves_nothing(tmp_path, stage, output, sig, code, words):
    out = tmp_path / "out"
    out.mkdir()
    process, ready = _start_slowed(tmp_path, stage, "merge", "demo", "--lora", "wday_locon:1", "-o", str(out / output))
    assert _staging(out), "the merge should be writing when the signal arrives"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines() == [f"error: {words}; unfinished output was removed"]
    assert list(out.iterdir()) == []


def test_sigkill_leaves_a_marked_staging_folder_that_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    process, _ = _start_slowed(tmp_path, "plan", "merge", "demo", "--lora", "wday_locon:1", "-o", str(out / "merged"))
    process.kill()
    process.communicate(timeout=60)
    left = _staging(out)
    assert len(left) == 1 and left[0].is_dir()
    assert staging_owner(left[0].name) == ("merged", "tmp", process.pid)
    assert left[0].name.startswith(".merged.scheduled-lora-tmp-")
    again = _run("merge", "demo", "--lora", "wday_locon:1", "-o", str(out / "merged"))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["merged"]


def test_sigkill_while_writing_a_file_is_cleaned_by_the_next_write_there(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = tmp_path / "sd1.safetensors"
    from safetensors.torch import save_file
    from support.sd_layouts import kohya_lora_state, tiny_sd

    save_file(tiny_sd("sd1").ldm_state_dict(), checkpoint)
    lora = tmp_path / "lora.safetensors"
    save_file(kohya_lora_state(tiny_sd("sd1")), lora)
    process, _ = _start_slowed(tmp_path, "save", "merge", str(checkpoint), "--lora", str(lora), "-o", str(out / "m.safetensors"))
    process.kill()
    process.communicate(timeout=60)
    assert [p.name.startswith(".m.safetensors.scheduled-lora-tmp-") for p in out.iterdir()] == [True]
    again = _run("merge", str(checkpoint), "--lora", str(lora), "-o", str(out / "m.safetensors"))
    assert again.returncode == 0, again.stderr
    assert [p.name for p in out.iterdir()] == ["m.safetensors"]


def test_merged_folders_and_files_follow_the_umask(tmp_path):
    out = tmp_path / "merged"
    result = _run("merge", "demo", "--lora", "wday", "-o", str(out), preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o750
    assert (out / "unet.safetensors").stat().st_mode & 0o777 == 0o640  # rewritten
    generated = _run("generate", "a wday", "--steps", "2", "-o", str(tmp_path / "g.png"), preexec_fn=lambda: os.umask(0o022))
    assert generated.returncode == 0, generated.stderr
    assert (tmp_path / "g.png").stat().st_mode & 0o777 == 0o644


def test_a_closed_pipe_ends_quietly():
    process = subprocess.Popen(
        [sys.executable, "-m", "lib_scheduled_lora", "schedule", "<lora:x:0@0,1@1>", "--steps", "1000", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(100)  # like `| head -c 100`
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.wait(timeout=60)
    assert process.returncode == 141, stderr
    assert stderr == ""


# -- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB file system (tmpfs), or a skip where this process may not mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize(
    "argv, free",
    [
        (["merge", "demo", "--lora", "wday", "-o", "{disk}/merged"], None),
        (["demo", "--seeds", "8", "--steps", "2", "--scale", "32", "--out", "{disk}/demo.png"], None),
        (["generate", "a white wday", "--steps", "2", "-o", "{disk}/new/g.png"], 1024),
    ],
    ids=["merge", "demo", "generate"],
)
def test_a_full_disk_is_one_line_and_leaves_nothing(small_disk, argv, free):
    """The demo model's weights (6 MB) do not fit in 1 MB; nor does a grid of 16 x 9 1024-pixel
    cells; a 32x32 PNG (2 KB) does not fit in what a filler file leaves."""
    if free is not None:
        with open(small_disk / "filler", "wb") as handle:
            handle.write(b"f" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - free))
    before = sorted(p.name for p in small_disk.iterdir())
    result = _run(*(a.replace("{disk}", str(small_disk)) for a in argv))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # A merge sees the lack of room before writing (its free-space check); the others when writing.
    last = result.stderr.splitlines()[-1]
    assert last.endswith("No space left on device") or ("not enough free space" in last and argv[0] == "merge"), last
    assert len([line for line in result.stderr.splitlines() if line.startswith("error: ")]) == 1
    assert sorted(p.name for p in small_disk.iterdir()) == before


def test_a_full_disk_while_writing_a_png_leaves_no_empty_file(tmp_path, monkeypatch, capsys):
    """Without root: the PNG writer fails as on a full disk (after writing a few bytes)."""
    from PIL import Image

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "new" / "g.png"
    assert main(["generate", "a wday", "--steps", "2", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith("cannot write: No space left on device"), err
    assert list(tmp_path.iterdir()) == []  # the folder it created is gone too


def test_a_safetensors_write_error_is_one_line(tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as its own SafetensorError, not an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "resized.safetensors"  # network files are written through safetensors' save_file
    assert main(["resize", str(demo.NETWORKS_DIR / "wday.safetensors"), "--rank", "2", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith("resized.safetensors: cannot write: No space left on device"), err
    assert list(tmp_path.iterdir()) == []


def test_demo_weights_are_untouched_by_a_demo_merge(tmp_path):
    before = {p.name: p.read_bytes() for p in demo.WEIGHTS_DIR.iterdir()}
    assert _run("merge", "demo", "--lora", "wday_locon:2", "-o", str(tmp_path / "m")).returncode == 0
    assert {p.name: p.read_bytes() for p in demo.WEIGHTS_DIR.iterdir()} == before
