"""Baking tensor by tensor: output dtypes with one rounding, metadata, the streaming writer's
promises (free space checked first, a killed process leaves no output), and its file format read
back by the safetensors library."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.sd_layouts import kohya_lora_state, ldm_state_dict, tiny_sd

from lib_scheduled_lora.core.combine import Term, combine
from lib_scheduled_lora.core.merge import merge_model
from lib_scheduled_lora.core.network_writer import BAKED_KEY, file_sha256
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.core.safetensors_stream import Planned, SafetensorsReader, StreamingWriter
from lib_scheduled_lora.core.staging import staging_owner
from lib_scheduled_lora.errors import ModelFormatError, OutputPathError

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("bake")
    model = tiny_sd("sd1")
    state = ldm_state_dict(model)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, root / "model.safetensors", metadata={"format": "pt", "mine": "kept"})
    save_file(kohya_lora_state(model, rank=2, seed=3), root / "lora.safetensors")
    return root, state, load_network(root / "lora.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype_is_one_rounding_of_the_float32_sum(sd1, tmp_path, dtype):
    root, state, network = sd1
    out = tmp_path / "out.safetensors"
    result = merge_model(root / "model.safetensors", [(network, 0.8)], out, dtype=dtype)
    baked = load_file(out)
    assert baked["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    changed = set(result.changed)
    assert changed and all(t.dtype == dtype for k, t in baked.items() if k != "cond_stage_model.transformer.text_model.embeddings.position_ids")
    from lib_scheduled_lora.core.naming import model_index

    index = model_index({k: tuple(v.shape) for k, v in state.items()})
    for key, module in network.modules.items():
        slot = index.slots[key]
        assert slot.rows is None
        want = combine(state[slot.weight], [Term(0.8, module)], out=torch.empty(slot.shape, dtype=dtype))
        assert torch.equal(baked[slot.weight], want), key  # bit for bit: float32 sum, one rounding
    untouched = next(k for k in state if k not in changed and state[k].is_floating_point())
    assert torch.equal(baked[untouched], state[untouched].to(dtype))


def test_metadata_records_the_networks_and_keeps_the_models_own(sd1, tmp_path):
    from lib_scheduled_lora.cli import main

    root, _, _ = sd1
    out = tmp_path / "out.safetensors"
    lora = root / "lora.safetensors"
    assert main(["merge", str(root / "model.safetensors"), "--lora", f"{lora}:0.5", "-o", str(out), "--quiet", "--dtype", "fp16"]) == 0
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["mine"] == "kept"
    baked = json.loads(metadata[BAKED_KEY])
    assert baked["dtype"] == "fp16"
    assert baked["networks"] == [
        {"file": "lora.safetensors", "sha256": file_sha256(lora), "strength": 0.5, "role": "network"}
    ]


def test_not_enough_free_space_is_refused_before_writing(sd1, tmp_path, monkeypatch):
    import shutil

    root, _, network = sd1
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(OutputPathError, match=r"out\.safetensors: not enough free space: the output needs [0-9.]+ MB, .* has 0\.0 MB free"):
        merge_model(root / "model.safetensors", [(network, 1.0)], tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_streamed_files_read_back_exactly(tmp_path):
    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 3, 3, dtype=torch.float16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False]),
    }
    path = tmp_path / "s.safetensors"
    planned = [Planned(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(path, planned, {"k": "v"}) as writer:
        for key, value in tensors.items():
            writer.write(key, value)
    back = load_file(path)  # the safetensors library's own reader
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    with SafetensorsReader(path) as reader:
        assert reader.metadata == {"k": "v"}
        assert all(torch.equal(reader.read(k), v) for k, v in tensors.items())
    with pytest.raises(ModelFormatError, match="already exists"):
        with StreamingWriter(path, planned):
            pass


def test_a_writer_left_early_writes_nothing(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(AssertionError, match="only 1 of 2 tensors"):
        with StreamingWriter(path, [Planned("a", torch.float32, (2,)), Planned("b", torch.float32, (2,))]) as writer:
            writer.write("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_a_killed_bake_leaves_no_output(sd1, tmp_path):
    """SIGKILL in the middle of writing: the output never appears (only the hidden temporary file
    can remain, as nothing runs after a SIGKILL)."""
    root, _, _ = sd1
    out = tmp_path / "out.safetensors"
    script = (
        "import sys, time\n"
        "from lib_scheduled_lora.core.merge import merge_model\n"
        "from lib_scheduled_lora.core.networks.loader import load_network\n"
        "slow = lambda label, done, total: time.sleep(0.05)\n"
        f"merge_model({str(root / 'model.safetensors')!r}, [(load_network({str(root / 'lora.safetensors')!r}), 1.0)], "
        f"{str(out)!r}, progress=slow)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    try:
        while not [p for p in tmp_path.iterdir() if staging_owner(p.name)]:
            assert process.poll() is None, "the bake ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not out.exists()
    assert [staging_owner(p.name)[:2] for p in tmp_path.iterdir()] == [("out.safetensors", "tmp")]  # type: ignore[index]
