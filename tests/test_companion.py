"""The companion tab's host-independent logic: output names confined to their folder, fields ->
arguments, bake/merge into the model folders (the model's config copied beside a bake), cancel
through the host's progress leaving nothing, and sweep axes ready for the XYZ grid."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import save_file
from support.random_networks import write
from support.sd_layouts import kohya_lora_state, ldm_state_dict, tiny_sd

from lib_scheduled_lora.core.lowrank import RankRule
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.core.output_names import confined_output
from lib_scheduled_lora.errors import Cancelled, MissingNetworkError, OutputNameError, RankRuleError
from lib_scheduled_lora.hosts import companion, xyz

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil", "without folders"),
        ("sub/evil", "without folders"),
        ("..\\evil", "without folders"),
        ("..", "without folders"),
        (".hidden", "may not start with '.'"),
        ("", "is empty"),
        ("a:b", "may not contain"),
        ("bad\x00name", "may not contain"),
        ("NUL", "reserved device name"),
        ("x" * 300, "longer than"),
    ],
)
def test_output_names_cannot_leave_their_folder(tmp_path, name, problem):
    with pytest.raises(OutputNameError, match=problem):
        confined_output(tmp_path, name)


def test_output_names(tmp_path):
    assert confined_output(tmp_path, "merged") == tmp_path.resolve() / "merged.safetensors"
    assert confined_output(tmp_path, "x.SAFETENSORS") == tmp_path.resolve() / "x.SAFETENSORS"
    outside = tmp_path.parent / "outside.safetensors"
    os.symlink(outside, tmp_path / "link.safetensors")
    with pytest.raises(OutputNameError, match="would leave the folder"):
        confined_output(tmp_path, "link")


def test_fields_become_arguments():
    assert companion.parse_network_specs("a:0.7, b:-0.4\nc") == [("a", 0.7), ("b", -0.4), ("c", 1.0)]
    with pytest.raises(RankRuleError, match="strength 'x' is not a number"):
        companion.parse_network_specs("a:x")
    assert companion.rank_rule("exact", 0, 0, 0.9) is None
    assert companion.rank_rule("rank", 8.0, 0, 0.9) == RankRule("rank", 8)
    assert companion.rank_rule("sv_fro", 16, 4, 0.9) == RankRule("sv_fro", 16, 4, 0.9)
    with pytest.raises(RankRuleError, match="--rank: is needed"):
        companion.rank_rule("rank", 0, 0, None)


@pytest.fixture
def folders(tmp_path):
    model = tiny_sd("sd1")
    loras, ckpts = tmp_path / "Lora", tmp_path / "Stable-diffusion"
    loras.mkdir()
    ckpts.mkdir()
    save_file(ldm_state_dict(model), ckpts / "base.safetensors")
    (ckpts / "base.yaml").write_text("model: {}\n")
    write(kohya_lora_state(model, rank=2, seed=1), loras / "a.safetensors")
    write(kohya_lora_state(model, rank=3, seed=2), loras / "b.safetensors")
    return companion.Folders([loras], [ckpts])


def test_bake_writes_into_the_checkpoint_folder_with_its_config(folders):
    out = companion.bake_checkpoint(folders.checkpoints[0] / "base.safetensors", [("a", 0.5)], "baked", folders)
    assert out.path == folders.checkpoints[0].resolve() / "baked.safetensors" and out.path.is_file()
    assert (folders.checkpoints[0] / "baked.yaml").read_text() == "model: {}\n"
    assert "a at 0.5:" in out.text()
    with pytest.raises(OutputNameError, match="already exists"):
        companion.bake_checkpoint(folders.checkpoints[0] / "base.safetensors", [("a", 0.5)], "baked", folders)


def test_merge_looks_names_up_in_the_index(folders):
    out = companion.merge_networks([("a", 0.7), ("b", -0.4)], "ab", folders, None)
    assert out.path.parent == folders.networks[0].resolve()
    assert {m.rank for m in load_network(out.path).modules.values()} == {5}
    with pytest.raises(MissingNetworkError, match="no network named '../Stable-diffusion/base'"):
        companion.merge_networks([("../Stable-diffusion/base", 1.0)], "x", folders, None)


def test_cancel_from_the_host_leaves_nothing(folders):
    before = sorted(p.name for p in folders.networks[0].iterdir())
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        companion.merge_networks([("a", 1.0), ("b", 1.0)], "c", folders, RankRule("rank", 2),
                                 progress=companion.Progress(None, cancelled))
    assert sorted(p.name for p in folders.networks[0].iterdir()) == before
    ckpts = sorted(p.name for p in folders.checkpoints[0].iterdir())
    with pytest.raises(Cancelled):
        companion.bake_checkpoint(folders.checkpoints[0] / "base.safetensors", [("a", 1.0)], "baked", folders,
                                  progress=companion.Progress(None, lambda: True))
    assert sorted(p.name for p in folders.checkpoints[0].iterdir()) == ckpts


def test_sweep_axes_go_to_the_xyz_grid_as_its_own_axes():
    plan = companion.sweep_plan("a cat <lora:a:1>", "", "strength", "0.5-1 [2]", "schedule", "0@0.3:1, 0@0;1@1")
    fields = companion.xyz_fields(plan)
    assert fields == [
        ("Scheduled LoRA: strength", "a=0.5, a=1"),
        ("Scheduled LoRA: schedule", "a=0@0.3:1, a=0@0;1@1"),
    ]
    assert set(companion.XYZ_LABELS.values()) <= set(xyz.AXES)
    assert companion.sweep_plan("<lora:a:1>", None, "switch", "0-1 [3]", "none", "").y is None
