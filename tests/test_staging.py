"""Staging names, stale entries of dead processes, and the output checks made before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib_scheduled_lora.core.staging import (
    STAGING_ROOM,
    check_output,
    remove_stale,
    staged_file,
    staged_folder,
    staging_owner,
    staging_prefix,
)
from lib_scheduled_lora.errors import OutputPathError


@pytest.fixture(scope="module")
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_staging_names_say_whose_and_what_they_are():
    name = staging_prefix("model.safetensors") + "abc123_x"
    assert name.startswith(".model.safetensors.scheduled-lora-tmp-")
    assert staging_owner(name) == ("model.safetensors", "tmp", os.getpid())
    assert staging_owner(staging_prefix("out", "old") + "zz") == ("out", "old", os.getpid())
    for other in (".model.safetensors.abc.tmp", "model.safetensors", ".x.scheduled-lora-tmp-12", ".x.scheduled-lora-new-1-a"):
        assert staging_owner(other) is None, other


def test_stale_entries_of_dead_processes_go_and_live_ones_stay(tmp_path, dead_pid):
    dead_file = tmp_path / f".m.safetensors.scheduled-lora-tmp-{dead_pid}-aaaa1111"
    dead_file.write_bytes(b"half a model")
    dead_folder = tmp_path / f".merged.scheduled-lora-tmp-{dead_pid}-bbbb2222"
    (dead_folder / "unet").mkdir(parents=True)
    (dead_folder / "unet" / "w.safetensors").write_bytes(b"x")
    live = tmp_path / f".other.scheduled-lora-tmp-{os.getppid()}-cccc3333"  # our parent: alive
    live.write_bytes(b"being written")
    mine = tmp_path / (staging_prefix("x") + "dddd4444")
    mine.write_bytes(b"this process")
    unrelated = tmp_path / ".m.safetensors.1234.tmp"  # not ours: never touched
    unrelated.write_bytes(b"someone else's")
    assert sorted(remove_stale(tmp_path)) == sorted([dead_file, dead_folder])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name, unrelated.name])


def test_an_old_output_set_aside_by_a_killed_run_is_put_back(tmp_path, dead_pid):
    aside = tmp_path / f".merged.scheduled-lora-old-{dead_pid}-eeee5555"
    aside.mkdir()
    (aside / "model_index.json").write_text("{}")
    remove_stale(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert (tmp_path / "merged" / "model_index.json").read_text() == "{}"
    # when the new output did arrive, the old one is deleted instead
    aside.mkdir()
    remove_stale(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_staged_file_publishes_or_leaves_nothing(tmp_path):
    target = tmp_path / "new" / "deeper" / "x.bin"
    with pytest.raises(KeyboardInterrupt):
        with staged_file(target, OutputPathError, create_parents=True) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone too
    with staged_file(target, OutputPathError, create_parents=True) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in target.parent.iterdir()] == ["x.bin"]
    with pytest.raises(OutputPathError, match="already exists"):
        with staged_file(target, OutputPathError, replace=False) as tmp:
            tmp.write_bytes(b"other")
    assert target.read_bytes() == b"whole" and len(list(target.parent.iterdir())) == 1


def test_staged_folder_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(out, OutputPathError, replace=True) as staging:
            (staging / "new").write_text("new")
            raise RuntimeError("a failure half way")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old"]
    with staged_folder(out, OutputPathError, replace=True) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["new"]


@pytest.mark.parametrize(
    "make, path, words",
    [
        (None, "", "is not a usable file name"),
        ("file", "a_file/x.png", "a_file is not a folder"),
        ("file", "a_file/deeper/x.png", "a_file is not a folder"),
        ("dir", "a_dir", "is a folder; give a file name"),
        (None, "n" * 300 + ".png", "bytes long; this file system allows"),
        (None, "n" * (256 - STAGING_ROOM) + ".png", "file name too long"),
        (None, "missing/x.png", "does not exist"),
    ],
)
def test_check_output_refuses_before_any_work(tmp_path, make, path, words):
    if make == "file":
        (tmp_path / "a_file").write_text("x")
    elif make == "dir":
        (tmp_path / "a_dir").mkdir()
    before = sorted(tmp_path.iterdir())
    with pytest.raises(OutputPathError, match=words.replace("(", r"\(").replace(")", r"\)")) as caught:
        check_output(str(tmp_path / path) if path else "", OutputPathError)
    assert len(str(caught.value)) < 300
    assert sorted(tmp_path.iterdir()) == before


def test_check_output_accepts_missing_folders_when_asked(tmp_path):
    check_output(tmp_path / "a" / "b" / "x.png", OutputPathError, create_parents=True)
    assert list(tmp_path.iterdir()) == []  # checked, nothing created


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_refuses_a_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(OutputPathError, match="permission denied"):
        check_output(locked / "x.png", OutputPathError)


def test_check_output_refuses_a_read_only_file_system(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(OutputPathError, match="read-only file system"):
            check_output(mount / "x.png", OutputPathError)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_staging_room_fits_the_largest_pid():
    assert len(staging_prefix("x")) - len(".x.") + 8 <= STAGING_ROOM
    assert Path("/proc/sys/kernel/pid_max").exists() is False or int(Path("/proc/sys/kernel/pid_max").read_text()) < 10**10
