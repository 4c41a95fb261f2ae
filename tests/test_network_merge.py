"""Merging networks into one, and resizing: against peft, diffusers and the maths.

Oracles:

* peft's ``add_weighted_adapter`` on the same two adapters (files saved by diffusers' own
  ``save_lora_weights``, so our loader reads them as any user's PEFT files): ``cat`` is the exact
  concatenation, ``svd`` (``svd_rank=k``) the rank-k cut of the weighted sum;
* diffusers' ``load_lora_weights`` + ``fuse_lora`` reading our output file (its kohya converter,
  independent of our loader): the fused weights are W + Σ wᵢ·ΔWᵢ;
* a full-rank SVD merge equals the exact merge; a LoHa + LoRA merge at full rank equals the
  modules' own ΔW, summed.
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.random_networks import Layer, random_network, write
from support.sd_layouts import kohya_lora_state, ldm_state_dict, tiny_sd
from support.tiny_models import tiny_pipeline, tiny_text_encoder, tiny_unet

from lib_scheduled_lora.commands import merge_networks as merge_networks_command
from lib_scheduled_lora.commands import resize as resize_command
from lib_scheduled_lora.core.lowrank import RankRule
from lib_scheduled_lora.core.model_reader import ModelReader
from lib_scheduled_lora.core.network_merge import merge_into_one
from lib_scheduled_lora.core.network_writer import METADATA_KEY, file_sha256
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.errors import NetworkFileError, ScheduledLoraError

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]
W_A, W_B = 0.7, -0.4
UNET_A = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
UNET_B = ["to_q", "to_v", "conv1", "conv_shortcut", "proj_out"]


def _delta(module, shape):
    return module.weight_delta(torch.zeros(shape))


# -- peft: cat and svd ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """Two PEFT adapters on one tiny UNet (different ranks, alphas and targets), each saved as a
    diffusers LoRA file, and the PeftModel holding both."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("peft")
    unet = tiny_unet()
    configs = {
        "a": LoraConfig(r=4, lora_alpha=6, target_modules=UNET_A, init_lora_weights=False),
        "b": LoraConfig(r=2, lora_alpha=1, target_modules=UNET_B, init_lora_weights=False),
    }
    torch.manual_seed(7)
    model = get_peft_model(unet, configs["a"], adapter_name="a")
    model.add_adapter("b", configs["b"])
    with torch.no_grad():  # non-trivial B factors (peft's random init is small but fine; scale it)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(3.0)
    files = {}
    for name, config in configs.items():
        state = get_peft_model_state_dict(model, adapter_name=name)
        state = {k.removeprefix("base_model.model."): v.contiguous() for k, v in state.items()}
        StableDiffusionPipeline.save_lora_weights(
            str(root), unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict(),
            weight_name=f"{name}.safetensors",
        )
        files[name] = root / f"{name}.safetensors"
    return model, files


def _peft_deltas(model, adapter):
    """kohya name -> peft's own ΔW of ``adapter`` for every layer that has it."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            out["lora_unet_" + name.replace(".", "_")] = module.get_delta_weight(adapter).detach().float()
    return out


def test_exact_merge_equals_peft_cat(peft_pair, tmp_path):
    model, files = peft_pair
    model.base_model.add_weighted_adapter(["a", "b"], [W_A, W_B], "cat", combination_type="cat")
    expected = _peft_deltas(model, "cat")
    merged = merge_into_one([(load_network(files["a"]), W_A), (load_network(files["b"]), W_B)])
    assert merged.exact and set(merged.ranks) <= {2, 4, 6}
    path = tmp_path / "cat.safetensors"
    _write(merged, path)
    network = load_network(path)
    assert set(network.modules) == set(expected)
    for key, want in expected.items():
        module = network.modules[key]
        torch.testing.assert_close(_delta(module, want.shape), want, atol=1e-5, rtol=1e-5, msg=key)
        if key.endswith(("to_q", "to_v", "conv1")):  # both adapters: ranks add up, as in peft
            assert module.rank == 6


def test_svd_merge_equals_peft_svd(peft_pair):
    model, files = peft_pair
    model.base_model.add_weighted_adapter(["a", "b"], [W_A, W_B], "svd3", combination_type="svd", svd_rank=3)
    expected = _peft_deltas(model, "svd3")
    merged = merge_into_one(
        [(load_network(files["a"]), W_A), (load_network(files["b"]), W_B)], RankRule("rank", 3, 3), device="cpu"
    )
    network = _as_network(merged)
    compared = 0
    for key, want in expected.items():
        module = network.modules[key]
        if module.rank < 3:
            continue  # a single rank-2 adapter: peft pads with zero components, we do not
        torch.testing.assert_close(_delta(module, want.shape), want, atol=1e-5, rtol=1e-4, msg=key)
        compared += 1
    assert compared >= 10
    report = {layer.key: layer for layer in merged.layers}
    assert all(0 < r.fro_kept <= 1 for r in report.values())
    assert any(r.fro_kept < 0.999 for r in report.values())  # rank 6 -> 3 loses something, and says so


# -- diffusers reads what we write ---------------------------------------------------------------


def test_diffusers_fuses_the_merged_file(tmp_path):
    """kohya-named LoRA + LoCon files on the tiny pipeline, merged exactly: diffusers' kohya
    converter reads the output, and fusing it equals W + Σ wᵢ·ΔWᵢ from the inputs."""
    pipe = tiny_pipeline(tiny_unet(), tiny_text_encoder())
    layers = _pipeline_layers(pipe)
    a = write(random_network(layers, rank=4, seed=1, alpha=lambda r: 2.0), tmp_path / "a.safetensors")
    b = write(random_network(layers[::2], rank=2, conv_rank=2, seed=2), tmp_path / "b.safetensors")
    na, nb = load_network(a), load_network(b)
    out = tmp_path / "merged.safetensors"
    _write(merge_into_one([(na, W_A), (nb, W_B)]), out)
    before = {layer.key: _module(pipe, layer.key).weight.detach().clone() for layer in layers}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    for layer in layers:
        base = before[layer.key]
        want = base + W_A * na.modules[layer.key].weight_delta(base)
        if layer.key in nb.modules:
            want = want + W_B * nb.modules[layer.key].weight_delta(base)
        got = _module(pipe, layer.key)
        got = (got.get_base_layer() if hasattr(got, "get_base_layer") else got).weight.detach()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=layer.key)


def _pipeline_layers(pipe) -> list[Layer]:
    layers = []
    for prefix, root in (("lora_unet_", pipe.unet), ("lora_te_", pipe.text_encoder)):
        for name, module in root.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and (
                "attentions" in name or "resnets" in name or "self_attn" in name
            ):
                path = name if prefix == "lora_unet_" or name.startswith("text_model.") else "text_model." + name
                layers.append(Layer(prefix + path.replace(".", "_"), tuple(module.weight.shape)))
    return layers


def _module(pipe, key):
    if key.startswith("lora_unet_"):
        lookup = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()}
    else:
        lookup = {}
        for n, m in pipe.text_encoder.named_modules():
            path = n if n.startswith("text_model.") else "text_model." + n
            lookup["lora_te_" + path.replace(".", "_")] = m
    return lookup[key]


# -- the maths without oracles -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    model = tiny_sd("sd1")
    save_file(ldm_state_dict(model), root / "model.safetensors")
    a = write(kohya_lora_state(model, rank=2, seed=1), root / "a.safetensors")
    b = write(kohya_lora_state(model, rank=3, seed=2, alpha=2.0), root / "b.safetensors")
    return root, model, a, b


def test_full_rank_svd_merge_equals_the_exact_merge(sd1_files):
    _, _, a, b = sd1_files
    sources = [(load_network(a), W_A), (load_network(b), W_B)]
    exact = _as_network(merge_into_one(sources))
    svd = merge_into_one(sources, RankRule("rank", 10_000), device="cpu")
    assert svd.exact and all(layer.fro_kept == pytest.approx(1.0) for layer in svd.layers)
    svd_net = _as_network(svd)
    assert set(svd_net.modules) == set(exact.modules)
    for key, module in exact.modules.items():
        shape = (module.up.shape[0], *module.down.shape[1:])
        torch.testing.assert_close(_delta(svd_net.modules[key], shape), _delta(module, shape), atol=1e-5, rtol=1e-4)


def test_loha_and_lora_through_svd_with_the_base_model(sd1_files, tmp_path):
    """LoHa conv layers flatten their kernel, so the model gives the shapes; at full rank the
    merged LoRA is exactly Σ wᵢ·ΔWᵢ of the modules themselves."""
    root, model, a, _ = sd1_files
    with ModelReader(root / "model.safetensors") as reader:
        layers = [Layer(name, slot.shape) for slot, name in reader.index.kohya_names.items()
                  if len(slot.shape) in (2, 4) and "resnets" in name]
        loha = write(random_network(layers, "loha", rank=2, seed=3), tmp_path / "loha.safetensors")
        sources = [(load_network(a), W_A), (load_network(loha), W_B)]
        with pytest.raises(NetworkFileError, match="does not tell its layer's shape.*--model"):
            merge_into_one(sources[1:], RankRule("rank", 4), device="cpu")  # the LoHa alone
        with pytest.raises(NetworkFileError, match=r"loha\.safetensors: .* is loha: only LoRA/LoCon"):
            merge_into_one(sources, model=reader)
        merged = merge_into_one(sources, RankRule("rank", 10_000), model=reader, device="cpu")
        out = _as_network(merged)
        for slot, name in reader.index.kohya_names.items():
            terms = [(w, n.modules[name]) for n, w in sources if name in n.modules]
            if not terms:
                assert name not in out.modules
                continue
            base = reader.read_slot(slot)
            want = sum(w * m.weight_delta(base) for w, m in terms)
            torch.testing.assert_close(out.modules[name].weight_delta(base), want, atol=1e-5, rtol=1e-4, msg=name)
        assert any(r.algorithms == ("lora", "loha") for r in merged.layers)
    # without the model, the LoRA's layers tell the shapes; the result is the same
    without = _as_network(merge_into_one(sources, RankRule("rank", 10_000), device="cpu"))
    for key, module in out.modules.items():
        shape = (module.up.shape[0], *module.down.shape[1:])
        torch.testing.assert_close(_delta(without.modules[key], shape), _delta(module, shape), atol=1e-5, rtol=1e-4)


def test_dora_and_ia3_need_the_base_model(tmp_path):
    g = torch.Generator().manual_seed(4)
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    dora = {f"{key}.lora_down.weight": torch.randn(2, 8, generator=g), f"{key}.lora_up.weight": torch.randn(8, 2, generator=g),
            f"{key}.dora_scale": torch.rand(8, 1, generator=g) + 0.5}
    ia3 = {f"{key}.weight": torch.rand(8, generator=g), f"{key}.on_input": torch.tensor(False)}
    for name, tensors in (("dora", dora), ("ia3", ia3)):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        with pytest.raises(NetworkFileError, match=f"{name}.safetensors: {key} is .*base model \\(--model\\)") as info:
            merge_into_one([(load_network(path), 1.0)], RankRule("rank", 4), device="cpu")
        assert "\n" not in str(info.value)


def test_tucker_locon_concatenates_exactly(tmp_path):
    g = torch.Generator().manual_seed(5)
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    tucker = {f"{key}.lora_down.weight": torch.randn(3, 6, 1, 1, generator=g),
              f"{key}.lora_mid.weight": torch.randn(3, 3, 3, 3, generator=g),
              f"{key}.lora_up.weight": torch.randn(8, 3, 1, 1, generator=g), f"{key}.alpha": torch.tensor(1.5)}
    plain = {f"{key}.lora_down.weight": torch.randn(2, 6, 3, 3, generator=g),
             f"{key}.lora_up.weight": torch.randn(8, 2, 1, 1, generator=g)}
    save_file(tucker, tmp_path / "t.safetensors")
    save_file(plain, tmp_path / "p.safetensors")
    t, p = load_network(tmp_path / "t.safetensors"), load_network(tmp_path / "p.safetensors")
    merged = _as_network(merge_into_one([(t, 0.5), (p, 2.0)]))
    module = merged.modules[key]
    assert module.rank == 5 and module.mid is None
    shape = (8, 6, 3, 3)
    want = 0.5 * _delta(t.modules[key], shape) + 2.0 * _delta(p.modules[key], shape)
    torch.testing.assert_close(_delta(module, shape), want, atol=1e-5, rtol=1e-5)


def test_layers_named_in_two_layouts_meet_on_the_model(sd1_files, tmp_path):
    """One file in kohya's diffusers-path names, one in ldm-path names (both are read by the
    WebUI): with the model they land on the same weights and come out under kohya's names."""
    root, model, a, _ = sd1_files
    with ModelReader(root / "model.safetensors") as reader:
        index = reader.index
        diffusers_names = load_network(a)
        ldm_style = {}
        for key, value in load_file(a).items():
            base, _, suffix = key.partition(".")
            slot = index.slots[base]
            other = next(n for n, s in index.slots.items() if s == slot and n != base and n.startswith("lora_unet_")) \
                if base.startswith("lora_unet_") else base
            ldm_style[f"{other}.{suffix}"] = value
        path = tmp_path / "ldm_names.safetensors"
        save_file(ldm_style, path)
        merged = merge_into_one([(diffusers_names, 1.0), (load_network(path), 1.0)], model=reader)
    assert {layer.key for layer in merged.layers} == set(diffusers_names.modules)
    assert all(layer.rank == 4 for layer in merged.layers)  # 2 + 2: the two met on every layer


def test_resize_with_a_kept_energy_rule(sd1_files):
    _, _, _, b = sd1_files
    network = load_network(b)
    merged = merge_into_one([(network, 1.0)], RankRule("sv_fro", rank=3, param=0.9), device="cpu")
    for layer in merged.layers:
        assert layer.fro_kept >= 0.9 - 1e-6 or layer.rank == 3
        assert layer.rank <= 3


# -- files and the command line ------------------------------------------------------------------


def _write(merged, path):
    from lib_scheduled_lora.core.network_writer import write_network

    write_network(merged, path, {"ss_network_module": "networks.lora"}, dtype=torch.float32)


def _as_network(merged):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "n.safetensors"
        _write(merged, path)
        return load_network(path)


def _run(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    try:
        return module.run(parser.parse_args(argv))
    except ScheduledLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def test_command_writes_kohya_file_with_metadata(sd1_files, tmp_path, capsys):
    root, _, a, b = sd1_files
    out = tmp_path / "m.safetensors"
    model = root / "model.safetensors"
    argv = [f"{a}:0.7", f"{b}:-0.4", "-o", str(out), "--quiet", "--layers", "--model", str(model)]
    assert _run(merge_networks_command, argv) == 0
    text = capsys.readouterr().out
    assert "exact" in text and "lora_unet_down_blocks_0_attentions_0_proj_in" in text
    import json

    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("lora_up.weight"))).dtype == torch.float16
    made = json.loads(metadata[METADATA_KEY])
    assert made["operation"] == "merge-networks" and made["rank_rule"] == "exact (concatenated ranks)"
    assert made["base_model"] == "model.safetensors"
    assert [(s["file"], s["strength"], s["sha256"]) for s in made["sources"]] == [
        ("a.safetensors", 0.7, file_sha256(a)), ("b.safetensors", -0.4, file_sha256(b))]
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    # an existing output is refused before any work; --force replaces it
    assert _run(merge_networks_command, [str(a), "-o", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _run(merge_networks_command, [str(a), "-o", str(out), "--quiet", "--force", "--rank", "1"]) == 0


def test_resize_command(sd1_files, tmp_path, capsys):
    _, _, _, b = sd1_files
    out = tmp_path / "r.safetensors"
    assert _run(resize_command, [str(b), "-o", str(out), "--sv-fro", "0.9", "--rank", "3", "--dtype", "fp32", "--quiet"]) == 0
    assert "fro kept: mean" in capsys.readouterr().out
    resized = load_network(out)
    assert max(m.rank for m in resized.modules.values()) <= 3
    assert _run(resize_command, [str(b), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "resize: needs --rank N" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sv-fro", "2"], "--sv-fro 2: must be a fraction in (0, 1]"),
        (["--conv-rank", "2"], "--conv-rank: needs --rank"),
        (["--rank", "2", "-o", "{tmp}/out.ckpt"], "out.ckpt: the output must be a .safetensors file"),
        (["-o", "{tmp}/missing/out.safetensors"], "does not exist"),
    ],
)
def test_command_errors_are_one_line(sd1_files, tmp_path, capsys, argv, message):
    _, _, a, _ = sd1_files
    argv = [x.replace("{tmp}", str(tmp_path)) for x in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "o.safetensors")]
    assert _run(merge_networks_command, [str(a), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_cancel_leaves_nothing_behind(sd1_files, tmp_path, monkeypatch):
    _, _, a, b = sd1_files

    def cancel(label, done, total):
        if done == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr("lib_scheduled_lora.commands.progress.terminal_progress", _fixed_progress(cancel))
    with pytest.raises(KeyboardInterrupt):
        _run(merge_networks_command, [str(a), str(b), "-o", str(tmp_path / "m.safetensors"), "--rank", "2"])
    assert list(tmp_path.iterdir()) == []


def _fixed_progress(callback):
    import contextlib

    @contextlib.contextmanager
    def progress(*args, **kwargs):
        yield callback

    return progress
