"""Reading / writing .safetensors files, and grouping a file's keys into modules (load_network)."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lib_scheduled_lora.core.networks import files
from lib_scheduled_lora.core.networks.describe import layer_kind
from lib_scheduled_lora.core.networks.family import guess_family
from lib_scheduled_lora.core.networks.files import read_safetensors, write_safetensors_atomic
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.core.networks.modules import IA3Module, LohaModule, LokrModule, LoraModule
from lib_scheduled_lora.errors import ModelFormatError, NetworkFileError


def _guess(network):
    return guess_family(network.modules, network.metadata)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def kohya_lora(rank=4, inp=32, out=32, alpha=2.0, name=KOHYA_Q):
    return {
        f"{name}.lora_down.weight": rand(rank, inp, seed=1),
        f"{name}.lora_up.weight": rand(out, rank, seed=2),
        f"{name}.alpha": torch.tensor(alpha),
    }


@pytest.fixture
def network_file(tmp_path):
    path = tmp_path / "net.safetensors"
    save_file(kohya_lora(), str(path), metadata={"ss_network_dim": "4"})
    return path


# -- read_safetensors ----------------------------------------------------------------------------


def test_round_trip_keeps_tensors_dtypes_and_metadata(tmp_path):
    tensors = {"a": rand(3, 4).half(), "b": rand(2).to(torch.bfloat16), "c": torch.arange(5)}
    path = tmp_path / "x.safetensors"
    write_safetensors_atomic(tensors, path, {"k": "v"})
    loaded, metadata = read_safetensors(path)
    assert metadata == {"k": "v"}
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].device.type == "cpu"
        assert torch.equal(loaded[key], tensor)


def expect_error(path, pattern):
    with pytest.raises(NetworkFileError) as info:
        read_safetensors(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert pattern in info.value.problem, info.value.problem
    return info.value


def test_missing_file_and_directory(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "file not found")
    expect_error(tmp_path, "is a directory")


def test_empty_and_tiny_files(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    expect_error(tmp_path / "empty.safetensors", "empty file")
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    expect_error(tmp_path / "short.safetensors", "not a safetensors file")


def test_random_bytes_are_not_a_safetensors_file(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(os.urandom(4096))
    expect_error(path, "safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_suffixes_are_refused_before_reading(tmp_path, suffix):
    path = tmp_path / f"net{suffix}"
    torch.save(kohya_lora(), path)
    error = expect_error(path, "pickle")
    assert "arbitrary code" in error.problem and ".safetensors" in error.problem


def test_pickle_content_is_refused_whatever_the_name(tmp_path):
    zipped = tmp_path / "zip.safetensors"
    torch.save(kohya_lora(), zipped)  # torch's zip container holding a pickle
    expect_error(zipped, "pickle")
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    expect_error(raw, "pickle")


def test_header_length_that_looks_like_a_pickle_opcode(tmp_path):
    """A 640-byte header makes the file start with b"\\x80\\x02", pickle protocol 2's first opcode."""
    metadata = {"pad": ""}
    path = tmp_path / "net.safetensors"
    for pad in range(700):
        metadata["pad"] = "x" * pad
        save_file(kohya_lora(), str(path), metadata=metadata)
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    tensors, _ = read_safetensors(path)
    assert set(tensors) == set(kohya_lora())


def test_truncated_at_several_offsets(network_file, tmp_path):
    data = network_file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    for cut, expected in [
        (4, "not a safetensors file"),
        (8 + header_len // 2, "truncated or not a safetensors file"),
        (8 + header_len + 10, "truncated"),
        (len(data) - 1, "1 bytes missing"),
    ]:
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        expect_error(path, expected)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_truncation_or_header_corruption_is_a_network_file_error(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    good = folder / "good.safetensors"
    save_file(kohya_lora(rank=2, inp=4, out=4), str(good))
    blob = bytearray(good.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="cut")]
    else:
        (header_len,) = struct.unpack("<Q", blob[:8])
        where = data.draw(st.integers(0, 8 + header_len - 1), label="byte")
        blob[where] ^= data.draw(st.integers(1, 255), label="xor")
    bad = folder / "bad.safetensors"
    bad.write_bytes(bytes(blob))
    try:
        read_safetensors(bad)  # a flipped byte inside a number can still be a valid file
    except NetworkFileError as exc:
        assert str(bad) in str(exc) and "\n" not in str(exc)


def test_bad_header_json(tmp_path):
    header = b"{not json}"
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    expect_error(path, "not valid JSON")


def test_header_entry_with_wrong_size(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    expect_error(path, "has 12 bytes for shape [2, 2]")


# -- write_safetensors_atomic -----------------------------------------------------------------------


def test_refuses_to_overwrite_unless_forced(tmp_path):
    path = tmp_path / "out.safetensors"
    write_safetensors_atomic({"a": torch.ones(2)}, path)
    with pytest.raises(NetworkFileError, match="already exists"):
        write_safetensors_atomic({"a": torch.zeros(2)}, path)
    with pytest.raises(ModelFormatError, match="already exists"):
        write_safetensors_atomic({"a": torch.zeros(2)}, path, error=ModelFormatError)
    assert torch.equal(read_safetensors(path)[0]["a"], torch.ones(2))
    write_safetensors_atomic({"a": torch.zeros(2)}, path, force=True)
    assert torch.equal(read_safetensors(path)[0]["a"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_shared_and_strided_tensors_are_written(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.T, "view": base[1], "same": base}
    path = tmp_path / "out.safetensors"
    write_safetensors_atomic(tensors, path)
    loaded, _ = read_safetensors(path)
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor)


@pytest.mark.parametrize("exception", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_no_half_written_file_on_failure(tmp_path, monkeypatch, exception):
    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise exception

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    path = tmp_path / "out.safetensors"
    with pytest.raises(type(exception)):
        write_safetensors_atomic({"a": torch.ones(2)}, path)
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    write_safetensors_atomic({"a": torch.ones(2)}, path)

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(NetworkFileError, match="No space left"):
        write_safetensors_atomic({"a": torch.zeros(2)}, path, force=True)
    monkeypatch.undo()
    assert torch.equal(read_safetensors(path)[0]["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_bad_metadata_and_missing_folder(tmp_path):
    with pytest.raises(NetworkFileError, match="metadata"):
        write_safetensors_atomic({"a": torch.ones(1)}, tmp_path / "x.safetensors", {"k": 1})
    with pytest.raises(NetworkFileError, match="does not exist"):
        write_safetensors_atomic({"a": torch.ones(1)}, tmp_path / "no" / "x.safetensors")


# -- load_network: kohya / LyCORIS keys ------------------------------------------------------------


def save(tmp_path, tensors, metadata=None, name="net.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_kohya_keys_group_into_modules(tmp_path):
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    loha = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {
        **kohya_lora(),
        **kohya_lora(name=te, inp=16, out=16),
        f"{loha}.hada_w1_a": rand(8, 2), f"{loha}.hada_w1_b": rand(2, 8 * 9), f"{loha}.hada_w2_a": rand(8, 2),
        f"{loha}.hada_w2_b": rand(2, 8 * 9), f"{loha}.alpha": torch.tensor(1.0),
        "lycoris_mid_block_attentions_0_proj_in.lokr_w1": rand(4, 4),
        "lycoris_mid_block_attentions_0_proj_in.lokr_w2": rand(8, 8),
        "lora_unet_up_blocks_0_resnets_0_time_emb_proj.weight": rand(32),
        "lora_unet_up_blocks_0_resnets_0_time_emb_proj.on_input": torch.tensor(0),
    }
    network = load_network(save(tmp_path, tensors, {"ss_base_model_version": "sd_v1"}), name="mine")
    assert network.name == "mine" and network.metadata["ss_base_model_version"] == "sd_v1"
    assert network.unrecognised_keys == []
    assert isinstance(network.modules[KOHYA_Q], LoraModule) and network.modules[KOHYA_Q].scale == 0.5
    assert isinstance(network.modules[te], LoraModule)
    assert isinstance(network.modules[loha], LohaModule)
    # the lycoris_ prefix is the UNet
    assert isinstance(network.modules["lora_unet_mid_block_attentions_0_proj_in"], LokrModule)
    assert isinstance(network.modules["lora_unet_up_blocks_0_resnets_0_time_emb_proj"], IA3Module)
    assert load_network(save(tmp_path, tensors, name="x.safetensors")).name == "x"


def test_unplaceable_keys_are_reported_not_dropped(tmp_path):
    tensors = {
        **kohya_lora(),
        "lora_unet_foo.lora_up.weight": rand(4, 2),  # no lora_down
        f"{KOHYA_Q}.oft_blocks": rand(2, 2),  # an algorithm we do not support
        "lora_unet_bar.lokr_t1": rand(2, 2, 3, 3),
        # newer LyCORIS "DoRA on the difference": different maths, reported rather than misapplied
        "lora_unet_baz.lora_up.weight": rand(4, 2), "lora_unet_baz.lora_down.weight": rand(2, 4),
        "lora_unet_baz.wd_for_diff": torch.tensor(True),
        "model.diffusion_model.out.2.weight": rand(4, 4),
    }
    network = load_network(save(tmp_path, tensors))
    assert list(network.modules) == [KOHYA_Q]
    assert network.unrecognised_keys == sorted(
        ["lora_unet_foo.lora_up.weight", f"{KOHYA_Q}.oft_blocks", "lora_unet_bar.lokr_t1", "model.diffusion_model.out.2.weight",
         "lora_unet_baz.lora_up.weight", "lora_unet_baz.lora_down.weight", "lora_unet_baz.wd_for_diff"]
    )


def test_file_without_network_keys(tmp_path):
    path = save(tmp_path, {"model.diffusion_model.input_blocks.0.0.weight": rand(4, 4), "other": rand(2)})
    with pytest.raises(NetworkFileError, match="no LoRA/LyCORIS keys") as info:
        load_network(path)
    assert str(info.value).startswith(str(path))


def test_malformed_module_is_a_file_error(tmp_path):
    path = save(tmp_path, {f"{KOHYA_Q}.lora_down.weight": rand(4, 8), f"{KOHYA_Q}.lora_up.weight": rand(8, 3)})
    with pytest.raises(NetworkFileError, match=f"{KOHYA_Q}: .*different ranks"):
        load_network(path)


# -- load_network: diffusers / PEFT keys -----------------------------------------------------------

UNET_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def peft_pair(prefix, rank=4, inp=32, out=32, style="peft"):
    down, up = rand(rank, inp, seed=1), rand(out, rank, seed=2)
    names = {
        "peft": ("lora_A.weight", "lora_B.weight"),
        "old": ("lora.down.weight", "lora.up.weight"),
        "linear_layer": ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
    }[style]
    return {f"{prefix}.{names[0]}": down, f"{prefix}.{names[1]}": up}


@pytest.mark.parametrize("style", ["peft", "old", "linear_layer"])
def test_diffusers_key_styles_agree(tmp_path, style):
    network = load_network(save(tmp_path, {**peft_pair(f"unet.{UNET_Q}", style=style), **peft_pair(f"text_encoder.{TE_Q}", style=style)}))
    unet_key = "lora_unet_" + UNET_Q.replace(".", "_")
    te_key = "lora_te_" + TE_Q.replace(".", "_")
    assert sorted(network.modules) == sorted([unet_key, te_key])
    module = network.modules[unet_key]
    assert module.alpha is None and module.scale == 1.0  # no alpha anywhere: alpha = rank
    torch.testing.assert_close(module.weight_delta(torch.zeros(32, 32)), rand(32, 4, seed=2) @ rand(4, 32, seed=1))


def test_old_attention_processor_keys(tmp_path):
    tensors = {
        **{k.replace("attn1.to_q.lora.", "attn1.processor.to_q_lora."): v for k, v in peft_pair(f"unet.{UNET_Q}", style="old").items()},
        **{k.replace("attn1.to_out.0.lora.", "attn1.processor.to_out_lora."): v for k, v in peft_pair(f"unet.{UNET_OUT}", style="old").items()},
        **{k.replace("q_proj.lora.", "to_q_lora."): v for k, v in peft_pair(f"text_encoder.{TE_Q}", style="old").items()},
    }
    assert any("processor.to_out_lora.down" in k for k in tensors) and any("self_attn.to_q_lora.up" in k for k in tensors)
    network = load_network(save(tmp_path, tensors))
    assert sorted(network.modules) == sorted(
        ["lora_unet_" + UNET_Q.replace(".", "_"), "lora_unet_" + UNET_OUT.replace(".", "_"), "lora_te_" + TE_Q.replace(".", "_")]
    )


def test_transformers5_text_encoder_names_and_sdxl_pair(tmp_path):
    flat = "encoder.layers.0.self_attn.q_proj"  # transformers 5 CLIPTextModel: no text_model level
    tensors = {**peft_pair(f"text_encoder.{flat}", inp=768, out=768), **peft_pair(f"text_encoder_2.{TE_Q}", inp=1280, out=1280)}
    network = load_network(save(tmp_path, tensors))
    assert sorted(network.modules) == ["lora_te1_" + TE_Q.replace(".", "_"), "lora_te2_" + TE_Q.replace(".", "_")]
    assert _guess(network).family == "sdxl"


def test_peft_alpha_from_keys_and_from_adapter_metadata(tmp_path):
    config = {"unet.lora_alpha": 8, "unet.r": 4, "unet.alpha_pattern": {"to_out.0": 2}, "unet.use_rslora": False,
              "text_encoder.lora_alpha": 3, "text_encoder.use_rslora": True}
    tensors = {**peft_pair(f"unet.{UNET_Q}"), **peft_pair(f"unet.{UNET_OUT}"), **peft_pair(f"text_encoder.{TE_Q}")}
    network = load_network(save(tmp_path, tensors, {"lora_adapter_metadata": json.dumps(config)}))
    q, out, te = (network.modules[k] for k in (
        "lora_unet_" + UNET_Q.replace(".", "_"), "lora_unet_" + UNET_OUT.replace(".", "_"), "lora_te_" + TE_Q.replace(".", "_")))
    assert (q.alpha, q.scale) == (8.0, 2.0)
    assert (out.alpha, out.scale) == (2.0, 0.5)
    assert te.alpha == 3.0 and te.scale == pytest.approx(3 / 2)  # rsLoRA: alpha / sqrt(rank 4)
    with_key = load_network(save(tmp_path, {**peft_pair(f"unet.{UNET_Q}"), f"unet.{UNET_Q}.alpha": torch.tensor(1.0)}, name="k.safetensors"))
    assert next(iter(with_key.modules.values())).scale == 0.25


def test_peft_dora_magnitude_is_per_output(tmp_path):
    conv = "down_blocks.0.attentions.0.proj_in"
    tensors = {
        f"unet.{conv}.lora_A.weight": rand(2, 8, 1, 1), f"unet.{conv}.lora_B.weight": rand(8, 2, 1, 1, seed=1),
        # PEFT's conv magnitude is [1, out, 1, 1]: the shape rule alone would call it per-input
        f"unet.{conv}.lora_magnitude_vector": rand(1, 8, 1, 1, seed=2).abs() + 1,
    }
    module = load_network(save(tmp_path, tensors)).modules["lora_unet_" + conv.replace(".", "_")]
    assert module.dora
    base = rand(8, 8, 1, 1, seed=3)
    merged = base + module.weight_delta(base)
    torch.testing.assert_close(merged.reshape(8, -1).norm(dim=1), tensors[f"unet.{conv}.lora_magnitude_vector"].reshape(-1), atol=1e-5, rtol=1e-5)


def test_two_spellings_of_one_layer_keep_the_first(tmp_path):
    tensors = {**kohya_lora(), **peft_pair(f"unet.{UNET_Q}")}
    network = load_network(save(tmp_path, tensors))
    assert list(network.modules) == [KOHYA_Q]
    assert sorted(network.unrecognised_keys) == sorted(peft_pair(f"unet.{UNET_Q}"))


# -- family guessing and layer kinds ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "context", "family"),
    [
        ({"ss_base_model_version": "sd_v1"}, None, "sd1"),
        ({"ss_base_model_version": "sdxl_base_v1-0"}, None, "sdxl"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, None, "sd2"),
        ({"ss_v2": "True"}, None, "sd2"),
        ({}, 768, "sd1"),
        ({}, 1024, "sd2"),
        ({}, 2048, "sdxl"),
        ({"ss_base_model_version": "sd_v1"}, 2048, "sdxl"),  # shapes win over metadata
        ({}, None, "unknown"),
    ],
)
def test_guess_family(tmp_path, metadata, context, family):
    # Layers of the second level, alike in every family, so that only widths and metadata tell.
    neutral = KOHYA_Q.replace("down_blocks_0", "down_blocks_1")
    tensors = dict(kohya_lora(name=neutral))
    if context:
        tensors.update(kohya_lora(inp=context, name=neutral.replace("attn1_to_q", "attn2_to_k")))
    guess = _guess(load_network(save(tmp_path, tensors, metadata)))
    assert guess.family == family and guess.reasons
    if context and metadata:
        assert any("suggests" in reason for reason in guess.reasons)


def test_layer_names_outweigh_metadata_and_say_sd_when_widths_cannot_tell(tmp_path):
    """down_blocks_0 attention exists only in SD 1.x/2.x: a file with it is not an SDXL file,
    whatever its metadata says; metadata then only tells 1.x from 2.x."""
    sdxl_meta = _guess(load_network(save(tmp_path, kohya_lora(), {"ss_base_model_version": "sdxl_base_v1-0"})))
    assert sdxl_meta.family == "sd" and any("suggests SDXL" in r for r in sdxl_meta.reasons)
    assert _guess(load_network(save(tmp_path, kohya_lora(), {"ss_v2": "True"}))).family == "sd2"
    assert _guess(load_network(save(tmp_path, kohya_lora()))).family == "sd"


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        (KOHYA_Q, "self-attention"),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "cross-attention"),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", "feed-forward"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "proj in/out"),
        ("lora_unet_down_blocks_0_resnets_0_conv1", "resnet conv"),
        ("lora_unet_input_blocks_1_0_in_layers_2", "resnet conv"),
        ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", "resnet time-embedding"),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", "down/upsampler conv"),
        ("lora_unet_input_blocks_3_0_op", "down/upsampler conv"),
        ("lora_unet_conv_in", "conv in/out"),
        ("lora_unet_time_embedding_linear_1", "time/label embedding"),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text-encoder mlp"),
        ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", "text-encoder attention"),
    ],
)
def test_layer_kind(key, kind):
    assert layer_kind(key) == kind
