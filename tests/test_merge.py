"""Merging networks into models: maths against diffusers' own LoRA fusing, files, atomicity.

Oracle: diffusers ``load_lora_weights`` + ``fuse_lora(lora_scale=w)`` on a tiny pipeline made of
the same weights, loading the same kohya file (diffusers converts kohya names with its own code).
Single-file results are converted back with diffusers' single-file converters before comparing.
"""

from __future__ import annotations

import argparse
import copy
import filecmp
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.sd_layouts import kohya_lora_state, tiny_sd
from support.tiny_models import clip_tokenizer_dir, tiny_vae

from lib_scheduled_lora.commands import merge as merge_command
from lib_scheduled_lora.core.merge import merge_model, merge_networks, parse_lora_spec
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.errors import NetworkFileError, OutputPathError, ScheduledLoraError

W = 0.7
ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer():
    from transformers import CLIPTokenizer

    folder = clip_tokenizer_dir()
    if folder is None:
        pytest.skip("no CLIP tokenizer in shared/data")
    return CLIPTokenizer.from_pretrained(str(folder))


def _sdxl_subset(key: str) -> bool:
    """One of each kind of SDXL layer (fusing every layer with PEFT takes too long for CI)."""
    parts = (
        "input_blocks_0_0",
        "input_blocks_3_0",
        "input_blocks_4_",
        "middle_block_",
        "output_blocks_2_",
        "output_blocks_8_",
        "label_emb",
        "time_embed",
        "out_2",
        "layers_1_",
    )
    return any(p in key for p in parts)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A diffusers folder, the same model as a single-file checkpoint, a kohya LoRA, and the
    weights diffusers gets by fusing that LoRA at strength W."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd1")
    model = tiny_sd("sd1")
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=copy.deepcopy(model.text_encoder),
        tokenizer=_tokenizer(),
        unet=copy.deepcopy(model.unet),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "diffusers")
    save_file(model.ldm_state_dict(), root / "model.safetensors")
    lora = root / "kohya.safetensors"
    save_file(kohya_lora_state(model), lora)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=W)
    pipe.unload_lora_weights()
    fused = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    fused.update({f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    return root, load_network(lora), fused


def _assert_matches_oracle(merged: dict[str, torch.Tensor], fused: dict[str, torch.Tensor], base):
    changed = {k for k in fused if not torch.equal(fused[k], base[k])}
    assert changed, "the oracle changed nothing"
    for key, expected in fused.items():
        got = merged[key]
        if key in changed:
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5, msg=key)
        else:
            assert torch.equal(got, expected), key  # untouched tensors keep their exact bits
    return changed


def _te_key(name: str) -> str:
    return name if name.startswith("text_model.") else "text_model." + name


# -- merge results against diffusers --------------------------------------------------------------


def test_diffusers_folder_matches_diffusers_fuse_lora(sd1, tmp_path):
    root, network, fused = sd1
    result = merge_model(root / "diffusers", [(network, W)], tmp_path / "out")
    out = tmp_path / "out"
    merged = {f"unet.{k}": v for k, v in load_file(out / "unet/diffusion_pytorch_model.safetensors").items()}
    merged.update(
        {f"text_encoder.{k}": v for k, v in load_file(out / "text_encoder/model.safetensors").items()}
    )
    base = tiny_sd("sd1").diffusers_state_dict()
    changed = _assert_matches_oracle(merged, fused, base)
    assert set(result.changed) == changed
    net = result.report.networks[0]
    assert net.matched == len(changed) and net.unmatched == []
    assert sorted(result.files_written) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    # every other file is a byte-identical copy
    for source in (root / "diffusers").rglob("*"):
        relative = source.relative_to(root / "diffusers")
        if source.is_file() and str(relative) not in result.files_written:
            assert filecmp.cmp(source, out / relative, shallow=False), relative
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_every_variant_of_a_folder_is_merged(sd1, tmp_path):
    """``diffusion_pytorch_model.fp16.safetensors`` beside the default file gets the same layers, in fp16."""
    import shutil

    root, network, _ = sd1
    model = tmp_path / "model"
    shutil.copytree(root / "diffusers", model)
    unet = load_file(model / "unet/diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in unet.items()}, model / "unet/diffusion_pytorch_model.fp16.safetensors")
    result = merge_model(model, [(network, W)], tmp_path / "out")
    assert sorted(result.files_written) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    full = load_file(tmp_path / "out/unet/diffusion_pytorch_model.safetensors")
    half = load_file(tmp_path / "out/unet/diffusion_pytorch_model.fp16.safetensors")
    key = "down_blocks.1.resnets.0.conv_shortcut.weight"
    assert half[key].dtype == torch.float16 and not torch.equal(half[key].float(), unet[key].half().float())
    torch.testing.assert_close(half[key].float(), full[key], atol=2e-3, rtol=2e-3)


def test_single_file_checkpoint_matches_diffusers_fuse_lora(sd1, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint

    root, network, fused = sd1
    merge_model(root / "model.safetensors", [(network, W)], tmp_path / "merged.safetensors")
    merged_ldm = load_file(tmp_path / "merged.safetensors")
    original = load_file(root / "model.safetensors")
    assert set(merged_ldm) == set(original)
    assert torch.equal(
        merged_ldm["first_stage_model.decoder.conv_in.weight"],
        original["first_stage_model.decoder.conv_in.weight"],
    )
    model = tiny_sd("sd1")
    merged = {f"unet.{k}": v for k, v in convert_ldm_unet_checkpoint(merged_ldm, model.unet.config).items()}
    merged.update({f"text_encoder.{k}": v for k, v in convert_ldm_clip_checkpoint(merged_ldm).items()})
    oracle = {
        (f"text_encoder.{_te_key(k[13:])}" if k.startswith("text_encoder.") else k): v
        for k, v in fused.items()
    }
    base = {
        (f"text_encoder.{_te_key(k[13:])}" if k.startswith("text_encoder.") else k): v
        for k, v in model.diffusers_state_dict().items()
    }
    oracle.pop("text_encoder.text_model.embeddings.position_ids", None)
    _assert_matches_oracle(merged, oracle, base)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """An sgm-named kohya SDXL LoRA and the weights diffusers gets by fusing it at strength W."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    model = tiny_sd("sdxl")
    lora = tmp_path_factory.mktemp("sdxl") / "xl.safetensors"
    save_file(kohya_lora_state(model, select=_sdxl_subset, seed=5), lora)
    tokenizer = _tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=copy.deepcopy(model.text_encoder),
        text_encoder_2=copy.deepcopy(model.text_encoder_2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=copy.deepcopy(model.unet),
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=W)
    pipe.unload_lora_weights()
    fused = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        fused.update({f"{component}.{k}": v for k, v in getattr(pipe, component).state_dict().items()})
    return load_network(lora), fused


def _spelled(key: str) -> str:
    """Text encoder names as diffusers' single-file converters spell them (with ``text_model.``)."""
    head, _, rest = key.partition(".")
    return f"{head}.{_te_key(rest)}" if head != "unet" and rest != "text_projection.weight" else key


def test_sdxl_sgm_named_lora_matches_diffusers_fuse_lora_in_both_layouts(sdxl):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )

    network, fused = sdxl
    model = tiny_sd("sdxl")
    base = model.diffusers_state_dict()

    report = merge_networks(base, [(network, W)])
    assert report.networks[0].unmatched == [] and (report.family, report.layout) == ("sdxl", "diffusers")
    changed = _assert_matches_oracle({**base, **report.tensors}, fused, base)
    assert len(changed) == report.networks[0].matched == len(report.tensors)

    ldm = model.ldm_state_dict()
    report = merge_networks(ldm, [(network, W)])
    assert report.networks[0].unmatched == [] and report.layout == "ldm"
    ldm = {**ldm, **report.tensors}
    merged = {f"unet.{k}": v for k, v in convert_ldm_unet_checkpoint(ldm, model.unet.config).items()}
    merged.update({f"text_encoder.{k}": v for k, v in convert_ldm_clip_checkpoint(ldm).items()})
    te2 = convert_open_clip_checkpoint(model.text_encoder_2, ldm, prefix="conditioner.embedders.1.model.")
    merged.update({f"text_encoder_2.{k}": v for k, v in te2.items()})
    # OpenCLIP keeps text_projection transposed (and no LoRA here touches it)
    oracle = {
        _spelled(k): v for k, v in fused.items() if not k.endswith(("position_ids", "text_projection.weight"))
    }
    base = {
        _spelled(k): v for k, v in base.items() if not k.endswith(("position_ids", "text_projection.weight"))
    }
    assert _assert_matches_oracle(merged, oracle, base) == {_spelled(k) for k in changed}


def test_sd2_fused_in_proj_rows_and_bias(tmp_path):
    """q/k/v land on row blocks of in_proj; a module with a bias difference changes in_proj_bias rows."""
    model = tiny_sd("sd2")
    ldm = model.ldm_state_dict()
    weight = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    bias = weight.replace("weight", "bias")
    d = ldm[weight].shape[0] // 3
    g = torch.Generator().manual_seed(0)
    diff, diff_b = torch.randn(d, d, generator=g), torch.randn(d, generator=g)
    down, up = torch.randn(2, d, generator=g), torch.randn(d, 2, generator=g)
    path = tmp_path / "sd2_rows.safetensors"
    save_file(
        {
            "lora_te_text_model_encoder_layers_0_self_attn_k_proj.diff": diff,
            "lora_te_text_model_encoder_layers_0_self_attn_k_proj.diff_b": diff_b,
            "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight": down,
            "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight": up,
            "lora_te_text_model_encoder_layers_0_self_attn_v_proj.alpha": torch.tensor(1.0),
        },
        path,
    )
    report = merge_networks(ldm, [(load_network(path), W)])
    new_w, new_b = report.tensors[weight], report.tensors[bias]
    old_w, old_b = ldm[weight], ldm[bias]
    assert torch.equal(new_w[:d], old_w[:d]) and torch.equal(new_b[:d], old_b[:d])  # q untouched
    torch.testing.assert_close(new_w[d : 2 * d], old_w[d : 2 * d] + W * diff)
    torch.testing.assert_close(new_b[d : 2 * d], old_b[d : 2 * d] + W * diff_b)
    torch.testing.assert_close(new_w[2 * d :], old_w[2 * d :] + W * 0.5 * (up @ down))  # alpha 1 / rank 2
    assert torch.equal(new_b[2 * d :], old_b[2 * d :])  # LoRA has no bias difference


# -- numerics -----------------------------------------------------------------------------------


def test_fp16_checkpoint_stays_fp16_with_a_single_rounding(sd1, tmp_path):
    root, network, _ = sd1
    half = {k: v.half() for k, v in load_file(root / "model.safetensors").items()}
    save_file(half, tmp_path / "half.safetensors")
    other = load_network(network.path)  # the same file twice: both contributions summed before rounding
    merge_model(tmp_path / "half.safetensors", [(network, W), (other, -0.3)], tmp_path / "out.safetensors")
    merged = load_file(tmp_path / "out.safetensors")
    assert all(v.dtype == torch.float16 for v in merged.values())
    weight = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    module = network.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    delta = module.weight_delta(half[weight])
    expected = (half[weight].float() + W * delta + (-0.3) * delta).half()
    assert torch.equal(merged[weight], expected)
    twice = ((half[weight].float() + W * delta).half().float() + (-0.3) * delta).half()
    assert not torch.equal(twice, expected)  # a second rounding would have been visible
    norm = "model.diffusion_model.input_blocks.1.1.norm.weight"
    assert torch.equal(merged[norm], half[norm])


def test_zero_strength_changes_nothing(sd1):
    root, network, _ = sd1
    state = load_file(root / "model.safetensors")
    report = merge_networks(state, [(network, 0.0)])
    assert report.tensors == {} and report.networks[0].matched > 0


# -- files: --force, atomicity ---------------------------------------------------------------------


def test_existing_output_needs_force(sd1, tmp_path):
    root, network, _ = sd1
    network = [(network, W)]
    for model, out in (
        (root / "model.safetensors", tmp_path / "x.safetensors"),
        (root / "diffusers", tmp_path / "d"),
    ):
        out.write_bytes(b"keep me") if out.suffix else (out.mkdir(), (out / "f").write_bytes(b"keep me"))
        with pytest.raises(OutputPathError, match="already exists.*--force"):
            merge_model(model, network, out)
        assert (out.read_bytes() if out.is_file() else (out / "f").read_bytes()) == b"keep me"
        merge_model(model, network, out, force=True)
        assert out.is_file() if out.suffix else (out / "model_index.json").is_file()
        assert not (out / "f").exists()


class _FailingFile:
    """A file whose writes fail with ``exc`` (a full disk, an interrupt); everything else passes through."""

    def __init__(self, inner, exc: BaseException):
        self._inner, self._exc = inner, exc

    def write(self, data):
        raise self._exc

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _failing_writes(monkeypatch, exc: BaseException, file_number: int = 1, tensor_number: int = 3):
    """Make the streaming writer write part of output file ``file_number`` and then fail with ``exc``
    at its tensor ``tensor_number`` (as a full disk or Ctrl-C would)."""
    from lib_scheduled_lora.core import safetensors_stream as stream

    real, writers, calls = stream.StreamingWriter.write, [], []

    def write(self, name, tensor):
        if not writers or writers[-1] is not self:
            writers.append(self)
            calls.clear()
        calls.append(name)
        if len(writers) == file_number and len(calls) == tensor_number:
            self._file.write(b"partial")
            self._file = _FailingFile(self._file, exc)
        return real(self, name, tensor)

    monkeypatch.setattr(stream.StreamingWriter, "write", write)


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_single_file_write_leaves_nothing_behind(sd1, tmp_path, monkeypatch, exc):
    root, network, _ = sd1
    _failing_writes(monkeypatch, exc)
    out = tmp_path / "merged.safetensors"
    with pytest.raises((OutputPathError, KeyboardInterrupt)):
        merge_model(root / "model.safetensors", [(network, W)], out)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")  # an existing output survives a failed --force
    _failing_writes(monkeypatch, exc)
    with pytest.raises((OutputPathError, KeyboardInterrupt)):
        merge_model(root / "model.safetensors", [(network, W)], out, force=True)
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"old"


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_folder_write_leaves_nothing_behind(sd1, tmp_path, monkeypatch, exc):
    root, network, _ = sd1
    out = tmp_path / "out"
    _failing_writes(monkeypatch, exc, file_number=2)  # the second weight file
    with pytest.raises((OutputPathError, KeyboardInterrupt)):
        merge_model(root / "diffusers", [(network, W)], out)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "old").write_text("old")
    _failing_writes(monkeypatch, exc, file_number=2)
    with pytest.raises((OutputPathError, KeyboardInterrupt)):
        merge_model(root / "diffusers", [(network, W)], out, force=True)
    assert list(tmp_path.iterdir()) == [out] and [p.name for p in out.iterdir()] == ["old"]


# -- command line ---------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    """What cli.main does for this command: run it, print ScheduledLoraError as one line, exit 2."""
    import sys

    parser = argparse.ArgumentParser()
    merge_command.add_arguments(parser)
    try:
        return merge_command.run(parser.parse_args(argv))
    except ScheduledLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def test_command_merges_and_reports(sd1, tmp_path, capsys):
    root, network, _ = sd1
    extra = tmp_path / "extra.safetensors"
    state = load_file(network.path)
    state["lora_te_text_model_encoder_layers_7_mlp_fc1.lora_down.weight"] = torch.zeros(2, 24)
    state["lora_te_text_model_encoder_layers_7_mlp_fc1.lora_up.weight"] = torch.zeros(48, 2)
    save_file(state, extra)
    out = tmp_path / "merged.safetensors"
    assert _run([str(root / "model.safetensors"), "--lora", f"{extra}:{W}", "-o", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "lora_te_text_model_encoder_layers_7_mlp_fc1" in captured.err
    assert "1 unmatched" in captured.out and "wrote" in captured.out
    out.unlink()
    assert _run([str(root / "model.safetensors"), "--lora", str(extra), "-o", str(out), "--strict"]) == 2
    assert "--strict" in capsys.readouterr().err and not out.exists()


def test_command_errors_are_one_line_naming_the_file(sd1, tmp_path, capsys):
    root, network, _ = sd1
    not_model = tmp_path / "not_model.safetensors"
    save_file({"foo": torch.zeros(2)}, not_model)
    plain_folder = tmp_path / "plain"
    plain_folder.mkdir()
    xl_lora = tmp_path / "xl.safetensors"
    save_file(
        kohya_lora_state(tiny_sd("sdxl"), select=lambda k: "input_blocks_4_1_transformer_blocks_1" in k),
        xl_lora,
    )
    cases = [
        ([str(tmp_path / "missing.safetensors"), "--lora", network.path], "missing.safetensors", "not found"),
        (
            [str(not_model), "--lora", network.path],
            "not_model.safetensors",
            "not a Stable Diffusion checkpoint",
        ),
        ([str(plain_folder), "--lora", network.path], str(plain_folder), "no model_index.json"),
        (
            [str(root / "model.safetensors"), "--lora", str(tmp_path / "nope.safetensors")],
            "nope.safetensors",
            "",
        ),
        ([str(root / "model.safetensors"), "--lora", str(xl_lora)], "xl.safetensors", "SDXL"),
    ]
    for argv, name, words in cases:
        assert _run([*argv, "-o", str(tmp_path / "o.safetensors")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and name in err and words in err, err
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_dispatches_merge(sd1, tmp_path, capsys):
    pytest.importorskip("lib_scheduled_lora.commands.inspect")  # the dispatcher imports every command
    from lib_scheduled_lora.cli import main

    root, network, _ = sd1
    out = tmp_path / "m.safetensors"
    assert (
        main(["merge", str(root / "model.safetensors"), "--lora", network.path, "-o", str(out), "--quiet"])
        == 0
    )
    assert main(["merge", str(root / "model.safetensors"), "--lora", network.path, "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_parse_lora_spec():
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_spec("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_spec("a.safetensors:-1") == ("a.safetensors", -1.0)
    assert parse_lora_spec(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert parse_lora_spec(r"C:\loras\a.safetensors:2") == (r"C:\loras\a.safetensors", 2.0)


@pytest.mark.parametrize("tail", ["nan", "inf", "-inf", "Infinity", "1e999"])
def test_lora_spec_strengths_follow_the_number_grammar(tail):
    # Python's float() reads these; a NaN strength would write a NaN checkpoint.
    with pytest.raises(NetworkFileError, match=rf"strength '{re.escape(tail)}' after ':' is not a finite number"):
        parse_lora_spec(f"a.safetensors:{tail}")


def test_lora_spec_strength_after_an_existing_file_must_be_a_number(tmp_path):
    network = tmp_path / "a.safetensors"
    network.write_bytes(b"")
    with pytest.raises(NetworkFileError, match="strength '1_0' after ':' is not a number"):
        parse_lora_spec(f"{network}:1_0")


def test_merge_networks_refuses_networks_that_do_not_fit(tmp_path):
    model = tiny_sd("sd1")
    path = tmp_path / "xl.safetensors"
    save_file(kohya_lora_state(tiny_sd("sdxl"), select=lambda k: k.startswith("lora_te2_")), path)
    with pytest.raises(NetworkFileError, match="SDXL"):
        merge_networks(model.diffusers_state_dict(), [(load_network(path), 1.0)])
