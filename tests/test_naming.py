"""kohya names -> model parameters, for SD 1.x / 2.x / SDXL in diffusers and ldm/sgm layouts.

Oracle: diffusers' single-file converters. The ldm fixtures are checked to convert back to exactly
the diffusers weights, then every kohya name (generated from the diffusers modules the way kohya's
trainer does) must land on the parameter holding that module's values.
"""

from __future__ import annotations

import pytest
import torch
from support.sd_layouts import FAMILIES, FakeBiasModule, FakeModule, _hf_key, kohya_keys, tiny_sd

from lib_scheduled_lora.core.naming import (
    NetworkMapping,
    Target,
    detect_layout,
    map_network,
    model_index,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)
from lib_scheduled_lora.core.networks.family import guess_family

LAYOUTS = ("diffusers", "ldm")


def _state(family: str, layout: str) -> dict[str, torch.Tensor]:
    model = tiny_sd(family)
    return model.diffusers_state_dict() if layout == "diffusers" else model.ldm_state_dict()


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _modules_for(family: str) -> tuple[dict[str, FakeModule], dict[str, str]]:
    """One fake module per kohya key of ``family``, with the shape of the diffusers weight."""
    model = tiny_sd(family)
    diffusers = model.diffusers_state_dict()
    keys = kohya_keys(model)
    modules = {
        key: FakeModule(key, tuple(diffusers[module + ".weight"].shape)) for key, module in keys.items()
    }
    return modules, keys


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the fixtures themselves agree with diffusers ----------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ldm_fixture_converts_back_with_diffusers_single_file_converters(family):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )

    model = tiny_sd(family)
    ldm = model.ldm_state_dict()
    unet = model.unet.state_dict()
    converted = convert_ldm_unet_checkpoint(ldm, model.unet.config)
    assert set(converted) == set(unet)
    assert all(torch.equal(converted[k], unet[k]) for k in unet)

    def same_text(converted: dict, module) -> None:
        expected = {
            ("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
            for k, v in module.state_dict().items()
        }
        expected.pop("text_model.embeddings.position_ids", None)
        assert set(converted) >= set(expected) - {"text_projection.weight"}
        for k in set(expected) & set(converted):
            assert torch.equal(converted[k], expected[k]), k

    if family == "sd1":
        same_text(convert_ldm_clip_checkpoint(ldm), model.text_encoder)
    elif family == "sd2":
        same_text(convert_open_clip_checkpoint(model.text_encoder, ldm), model.text_encoder)
    else:
        same_text(convert_ldm_clip_checkpoint(ldm), model.text_encoder)
        te2 = convert_open_clip_checkpoint(model.text_encoder_2, ldm, prefix="conditioner.embedders.1.model.")
        same_text(te2, model.text_encoder_2)


# -- layout detection -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_detect_layout(family, layout):
    shapes = _shapes(_state(family, layout))
    assert detect_layout(shapes) == (family, layout)
    assert detect_layout(shapes.keys(), shapes) == (family, layout)


def test_detect_layout_without_shapes_and_unknown():
    assert detect_layout(["model.diffusion_model.input_blocks.0.0.weight"]) == ("sd1", "ldm")
    assert detect_layout(["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]) == (
        "sd2",
        "ldm",
    )
    assert detect_layout(["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"]) == (
        "sdxl",
        "ldm",
    )
    assert detect_layout(["unet.add_embedding.linear_1.weight"]) == ("sdxl", "diffusers")
    assert detect_layout(["encoder.conv_in.weight", "decoder.conv_out.weight"]) == ("unknown", "unknown")


# -- every kohya key lands on the right parameter ------------------------------------------------

# Weights that OpenCLIP keeps as bare parameters (no module), which no LoRA trainer targets.
OPEN_CLIP_UNMAPPED = {"text_model_embeddings_position_embedding", "text_projection"}


def _expected_unmatched(family: str, layout: str, keys) -> set[str]:
    if layout != "ldm":
        return set()
    fused = {"sd2": "lora_te_", "sdxl": "lora_te2_"}.get(family)
    return {k for k in keys if fused and k.startswith(fused) and k[len(fused) :] in OPEN_CLIP_UNMAPPED}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_kohya_key_maps_to_its_module(family, layout):
    modules, keys = _modules_for(family)
    state = _state(family, layout)
    diffusers = tiny_sd(family).diffusers_state_dict()
    mapping = map_network(modules, _shapes(state))

    assert isinstance(mapping, NetworkMapping)
    assert (mapping.family, mapping.layout) == (family, layout)
    assert set(mapping.unmatched) == _expected_unmatched(family, layout, keys)
    assert mapping.incompatible is None
    assert len(mapping.targets) + len(mapping.unmatched) == len(modules)

    for target in mapping.targets:
        assert isinstance(target, Target)
        assert target.module is modules[target.key]
        module = keys[target.key]
        expected_component = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}[
            module.split(".")[0]
        ]
        assert target.component == expected_component
        if layout == "diffusers":
            assert target.weight == module + ".weight" and target.rows is None
        # Value oracle: the target holds this module's weights (every tensor is random, so no
        # other parameter can be equal).
        got = state[target.weight]
        if target.rows is not None:
            got = got[target.rows[0] : target.rows[1]]
        assert torch.equal(got, diffusers[module + ".weight"]), (target.key, target.weight)
        assert target.bias is None  # FakeModule cannot change biases


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_default_and_locon_layers_are_all_covered(family):
    """The generated key set really contains what kohya's LoRA and LoCon presets train."""
    _, keys = _modules_for(family)
    text = "\n".join(keys)
    unet_parts = [
        "attn1_to_q",
        "attn1_to_k",
        "attn1_to_v",
        "attn1_to_out_0",
        "attn2_to_q",
        "attn2_to_k",
        "attn2_to_v",
        "attn2_to_out_0",
        "ff_net_0_proj",
        "ff_net_2",
        "proj_in",
        "proj_out",
    ]
    if family == "sdxl":
        unet_parts += ["in_layers_2", "out_layers_3", "skip_connection", "emb_layers_1", "_0_op", "_conv"]
    else:
        unet_parts += [
            "conv1",
            "conv2",
            "conv_shortcut",
            "time_emb_proj",
            "downsamplers_0_conv",
            "upsamplers_0_conv",
        ]
    te_parts = [
        "self_attn_q_proj",
        "self_attn_k_proj",
        "self_attn_v_proj",
        "self_attn_out_proj",
        "mlp_fc1",
        "mlp_fc2",
    ]
    for part in unet_parts + te_parts:
        assert part in text, part


# -- hand-checked examples (A1111's convert_diffusers_name_to_compvis gives the same) ---------------


@pytest.mark.parametrize(
    ("key", "ldm"),
    [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        ),
        ("lora_unet_down_blocks_1_attentions_1_proj_in", "input_blocks.5.1.proj_in"),
        ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("lora_unet_down_blocks_2_resnets_1_time_emb_proj", "input_blocks.8.0.emb_layers.1"),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", "input_blocks.3.0.op"),
        ("lora_unet_down_blocks_3_resnets_1_conv2", "input_blocks.11.0.out_layers.3"),
        ("lora_unet_mid_block_attentions_0_proj_out", "middle_block.1.proj_out"),
        ("lora_unet_mid_block_resnets_1_conv1", "middle_block.2.in_layers.2"),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", "output_blocks.2.1.conv"),
        ("lora_unet_up_blocks_1_upsamplers_0_conv", "output_blocks.5.2.conv"),
        (
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
            "output_blocks.11.1.transformer_blocks.0.ff.net.2",
        ),
        ("lora_unet_time_embedding_linear_2", "time_embed.2"),
        ("lora_unet_conv_in", "input_blocks.0.0"),
        ("lora_unet_conv_out", "out.2"),
    ],
)
def test_sd1_examples_in_both_layouts(key, ldm):
    """diffusers-style kohya names on the ldm model, and their sgm spelling on the diffusers model."""
    state = _state("sd1", "ldm")
    weight = "model.diffusion_model." + ldm + ".weight"
    mapping = map_network({key: FakeModule(key, state[weight].shape)}, _shapes(state))
    assert [t.weight for t in mapping.targets] == [weight]
    diffusers = _shapes(_state("sd1", "diffusers"))
    sgm_key = "lora_unet_" + ldm.replace(".", "_")
    expected = "unet." + unet_ldm_to_diffusers(ldm) + ".weight"
    assert (
        map_network({sgm_key: FakeModule(sgm_key, state[weight].shape)}, diffusers).targets[0].weight
        == expected
    )


def test_sd1_text_encoder_also_answers_to_te1():
    """The WebUI accepts SD 1.x files whose text encoder keys say lora_te1_; SD 2.x has no such alias."""
    key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    # A key only SD 1.x/2.x UNets have, so that lora_te1_ alone does not read as an SDXL file.
    sd_sign = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    for family, width in (("sd1", 24), ("sd2", 40)):
        for layout in LAYOUTS:
            state = _shapes(_state(family, layout))
            modules = {key: FakeModule(key, (width, width)), sd_sign: FakeModule(sd_sign, (16, 16))}
            mapping = map_network(modules, state)
            assert mapping.incompatible is None
            if family == "sd1":
                assert [t.key for t in mapping.targets] == [key, sd_sign] and mapping.targets[
                    0
                ].component == "te"
            else:
                assert mapping.unmatched == [key]


def test_sdxl_sgm_names_reach_diffusers_and_diffusers_names_reach_sgm():
    """kohya SDXL files use sgm names; some trainers write diffusers-style names. Both layouts take both."""
    diffusers = _shapes(_state("sdxl", "diffusers"))
    ldm = _shapes(_state("sdxl", "ldm"))
    pairs = [
        (
            "input_blocks.4.1.transformer_blocks.1.attn2.to_k",
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        ),
        ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
        ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
        ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
        ("output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
        (
            "middle_block.1.transformer_blocks.2.ff.net.0.proj",
            "mid_block.attentions.0.transformer_blocks.2.ff.net.0.proj",
        ),
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
    ]
    for sgm, diff in pairs:
        for prefix in ("lora_unet_", "lycoris_"):
            for name in (sgm, diff):
                key = prefix + name.replace(".", "_")
                module = FakeModule(key, diffusers["unet." + diff + ".weight"])
                assert map_network({key: module}, diffusers).targets[0].weight == "unet." + diff + ".weight"
                assert (
                    map_network({key: module}, ldm).targets[0].weight
                    == "model.diffusion_model." + sgm + ".weight"
                )


def test_unet_path_conversions_round_trip_on_every_parameter():
    for family in FAMILIES:
        model = tiny_sd(family)
        up = {i for i, block in enumerate(model.unet.up_blocks) if hasattr(block, "attentions")}
        label = "add_embedding" if family == "sdxl" else "class_embedding"
        for name in model.unet.state_dict():
            ldm = unet_diffusers_to_ldm(name, up, 2)
            assert unet_ldm_to_diffusers(ldm, 2, label) == name


# -- SD 2.x / SDXL fused q/k/v ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "prefix", "root"),
    [
        ("sd2", "lora_te_", "cond_stage_model.model."),
        ("sdxl", "lora_te2_", "conditioner.embedders.1.model."),
    ],
)
def test_open_clip_in_proj_rows_and_bias(family, prefix, root):
    state = _state(family, "ldm")
    weight = root + "transformer.resblocks.1.attn.in_proj_weight"
    d = state[weight].shape[0] // 3
    modules = {
        f"{prefix}text_model_encoder_layers_1_self_attn_{p}_proj": FakeBiasModule("", (d, d)) for p in "qkv"
    }
    modules[f"{prefix}text_model_encoder_layers_1_mlp_fc2"] = FakeBiasModule("", (d, 2 * d))
    modules[f"{prefix}text_model_encoder_layers_1_self_attn_out_proj"] = FakeModule("", (d, d))
    mapping = map_network(modules, _shapes(state))
    got = {t.key.rsplit("_", 2)[-2] + "_" + t.key.rsplit("_", 1)[-1]: t for t in mapping.targets}
    assert not mapping.unmatched
    for i, p in enumerate("qkv"):
        t = got[f"{p}_proj"]
        assert (t.weight, t.rows, t.bias) == (weight, (i * d, (i + 1) * d), weight.replace("weight", "bias"))
        assert t.component == ("te" if family == "sd2" else "te2")
    assert (got["mlp_fc2"].weight, got["mlp_fc2"].bias) == (
        root + "transformer.resblocks.1.mlp.c_proj.weight",
        root + "transformer.resblocks.1.mlp.c_proj.bias",
    )
    assert got["out_proj"].weight == root + "transformer.resblocks.1.attn.out_proj.weight"
    assert got["out_proj"].bias is None  # module cannot change biases


# -- reporting --------------------------------------------------------------------------------


def test_unmatched_keys_are_reported_with_reasons():
    unet_only = {k: v for k, v in _shapes(_state("sd1", "diffusers")).items() if k.startswith("unet.")}
    d = unet_only["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"][0]
    modules = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": FakeModule("", (d, d)),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": FakeModule("", (24, 24)),
        "lora_unet_down_blocks_9_attentions_0_proj_in": FakeModule("", (d, d)),
        "something_else": FakeModule("", (1,)),
    }
    mapping = map_network(modules, unet_only)
    assert [t.key for t in mapping.targets] == [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    ]
    reasons = dict(mapping.unmatched_reasons)
    assert mapping.unmatched == list(reasons)
    assert "no text encoder" in reasons["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert "no unet layer" in reasons["lora_unet_down_blocks_9_attentions_0_proj_in"]
    assert "prefix" in reasons["something_else"]
    assert mapping.incompatible is None


def test_wrong_size_is_unmatched_and_marks_the_network_incompatible():
    """An SD 1.x LoRA on SD 2.x: cross-attention keys have the wrong width."""
    sd1_modules, _ = _modules_for("sd1")
    mapping = map_network(sd1_modules, _shapes(_state("sd2", "ldm")))
    reasons = dict(mapping.unmatched_reasons)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert key in mapping.unmatched and "elements" in reasons[key]
    assert mapping.incompatible and "wrong size" in mapping.incompatible


def test_linear_delta_fits_a_1x1_conv_weight():
    """SD 1.x proj_in is a 1x1 conv; a LoRA trained on a linear proj_in has the same numel."""
    state = _shapes(_state("sd1", "ldm"))
    weight = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    out, inp = state[weight][:2]
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert map_network({key: FakeModule(key, (out, inp))}, state).targets[0].weight == weight


@pytest.mark.parametrize(("network", "model"), [("sdxl", "sd1"), ("sd1", "sdxl"), ("sdxl", "sd2")])
def test_network_for_another_family_is_incompatible(network, model):
    modules, _ = _modules_for(network)
    for layout in LAYOUTS:
        mapping = map_network(modules, _shapes(_state(model, layout)))
        assert mapping.targets == [] and len(mapping.unmatched) == len(modules)
        assert "SDXL" in mapping.incompatible


def test_guess_family_from_names_alone():
    def family(*keys):
        return guess_family({key: FakeModule(key, (1,)) for key in keys}).family

    assert family("lora_te1_text_model_encoder_layers_0_mlp_fc1") == "sdxl"
    assert family("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q") == "sdxl"
    assert family("lora_te_text_model_encoder_layers_0_mlp_fc1") == "sd"
    assert family("lora_unet_down_blocks_0_attentions_0_proj_in") == "sd"
    assert family("lora_unet_down_blocks_1_attentions_0_proj_in") == "unknown"  # alike in every family
    assert family("lora_te_x", "lora_te2_x") == "unknown"  # signs of both families


def test_unknown_model_lists_everything_unmatched():
    key = "lora_unet_conv_in"
    mapping = map_network({key: FakeModule(key, (1,))}, {"encoder.conv_in.weight": (4, 4, 3, 3)})
    assert mapping.unmatched == [key] and mapping.layout == "unknown"


# -- host quirks ------------------------------------------------------------------------------


def test_webui_wrapped_names_and_text_model_level():
    """The WebUI wraps its text encoders (``.wrapped``); hub diffusers folders keep ``text_model.``."""
    state = _shapes(_state("sd1", "ldm"))
    wrapped = {k.replace("cond_stage_model.", "cond_stage_model.wrapped."): v for k, v in state.items()}
    key = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    module = FakeModule(key, state["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"])
    target = map_network({key: module}, wrapped).targets[0]
    assert target.weight == "cond_stage_model.wrapped.transformer.text_model.encoder.layers.1.mlp.fc1.weight"

    hub = {
        ("text_encoder.text_model." + k[len("text_encoder.") :] if k.startswith("text_encoder.") else k): v
        for k, v in _shapes(_state("sd1", "diffusers")).items()
    }
    assert (
        map_network({key: module}, hub).targets[0].weight
        == "text_encoder.text_model.encoder.layers.1.mlp.fc1.weight"
    )


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_openclip_encoders_in_transformers_layout_under_ldm_roots(family):
    """Forge (and ComfyUI) load SD 2.x's and SDXL's OpenCLIP encoders as transformers models: the
    sgm/ldm root then holds ``transformer.text_model...`` instead of ``model.transformer...``."""
    model = tiny_sd(family)
    state = {k: v for k, v in _shapes(model.ldm_state_dict()).items() if ".model." not in k.split("diffusion_model")[0]}
    encoder, root, prefix = (
        (model.text_encoder, "cond_stage_model.transformer.", "lora_te_")
        if family == "sd2"
        else (model.text_encoder_2, "conditioner.embedders.1.transformer.", "lora_te2_")
    )
    state.update({root + _hf_key(k): tuple(v.shape) for k, v in encoder.state_dict().items()})
    key = prefix + "text_model_encoder_layers_1_self_attn_k_proj"
    weight = root + "text_model.encoder.layers.1.self_attn.k_proj.weight"
    mapping = map_network({key: FakeModule(key, state[weight])}, state)
    assert mapping.family == family and mapping.unmatched == []
    assert (mapping.targets[0].weight, mapping.targets[0].rows) == (weight, None)


def test_index_is_cached_per_model():
    state = _shapes(_state("sdxl", "ldm"))
    assert model_index(state) is model_index(dict(state))
    index = model_index(state)
    key = "lora_unet_input_blocks_4_1_proj_in"
    assert (
        map_network(
            {key: FakeModule(key, state["model.diffusion_model.input_blocks.4.1.proj_in.weight"])}, index
        )
        .targets[0]
        .weight
        == "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    )


def test_every_module_kind_states_its_size_without_computing_delta(tmp_path):
    """delta_numel and fits, from the file's tensors alone, agree with the ΔW each module computes:
    LoRA, LoCon (kxk), Tucker (lora_mid), DoRA, LoHa (plain and Tucker), LoKr, full, norm, IA3."""
    from safetensors.torch import save_file

    from lib_scheduled_lora.core.networks.loader import load_network

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    r = 2
    state = {
        "lora_unet_a.lora_down.weight": rnd(r, 8), "lora_unet_a.lora_up.weight": rnd(6, r),
        "lora_unet_b.lora_down.weight": rnd(r, 4, 3, 3), "lora_unet_b.lora_up.weight": rnd(5, r, 1, 1),
        "lora_unet_c.lora_down.weight": rnd(r, 4, 1, 1), "lora_unet_c.lora_mid.weight": rnd(r, r, 3, 3),
        "lora_unet_c.lora_up.weight": rnd(5, r, 1, 1),
        "lora_unet_d.lora_down.weight": rnd(r, 8), "lora_unet_d.lora_up.weight": rnd(6, r),
        "lora_unet_d.dora_scale": torch.rand(6, 1, generator=g) + 0.5,
        "lora_unet_e.hada_w1_a": rnd(6, r), "lora_unet_e.hada_w1_b": rnd(r, 8),
        "lora_unet_e.hada_w2_a": rnd(6, r), "lora_unet_e.hada_w2_b": rnd(r, 8),
        "lora_unet_f.hada_w1_a": rnd(r, 5), "lora_unet_f.hada_w1_b": rnd(r, 4), "lora_unet_f.hada_t1": rnd(r, r, 3, 3),
        "lora_unet_f.hada_w2_a": rnd(r, 5), "lora_unet_f.hada_w2_b": rnd(r, 4), "lora_unet_f.hada_t2": rnd(r, r, 3, 3),
        "lora_unet_g.lokr_w1": rnd(2, 2), "lora_unet_g.lokr_w2_a": rnd(3, r), "lora_unet_g.lokr_w2_b": rnd(r, 4),
        "lora_unet_h.diff": rnd(6, 8), "lora_unet_h.diff_b": rnd(6),
        "lora_unet_i.w_norm": rnd(6), "lora_unet_i.b_norm": rnd(6),
        "lora_unet_j.weight": rnd(8), "lora_unet_j.on_input": torch.tensor(1),
    }
    save_file(state, tmp_path / "n.safetensors")
    modules = load_network(tmp_path / "n.safetensors").modules
    shapes = {
        "lora_unet_a": (6, 8), "lora_unet_b": (5, 4, 3, 3), "lora_unet_c": (5, 4, 3, 3), "lora_unet_d": (6, 8),
        "lora_unet_e": (6, 8), "lora_unet_f": (5, 4, 3, 3), "lora_unet_g": (6, 8), "lora_unet_h": (6, 8),
        "lora_unet_i": (6,), "lora_unet_j": (6, 8),
    }
    for key, shape in shapes.items():
        module = modules[key]
        assert module.fits(shape) is None, key
        assert module.fits(tuple(s + 1 for s in shape)) is not None, key  # the wrong widths are refused
        numel = module.delta_numel()
        assert numel is None or numel == module.weight_delta(torch.randn(shape)).numel(), key
    assert modules["lora_unet_j"].delta_numel() is None  # IA3: as large as the layer it scales
    assert [k for k, m in modules.items() if m.changes_bias] == ["lora_unet_h", "lora_unet_i"]
    assert [k for k, m in modules.items() if m.can_bypass] == ["lora_unet_a", "lora_unet_b", "lora_unet_c"]


@pytest.mark.parametrize("kind", ["loha", "lokr", "full", "ia3", "norm"])
def test_wrong_width_of_every_module_kind_is_refused_before_sampling(kind):
    """Not only LoRA: every kind of module whose size does not fit its layer is unmatched when the
    network is mapped (so nothing is written mid-sampling), with the same one-line reason."""
    from lib_scheduled_lora.core.networks.modules import build_module

    state = _shapes(_state("sd1", "diffusers"))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    out, inp = state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    wrong = inp + 3
    tensors = {
        "loha": {"hada_w1_a": torch.ones(out, 2), "hada_w1_b": torch.ones(2, wrong),
                 "hada_w2_a": torch.ones(out, 2), "hada_w2_b": torch.ones(2, wrong)},
        "lokr": {"lokr_w1": torch.ones(1, 1), "lokr_w2": torch.ones(out, wrong)},
        "full": {"diff": torch.ones(out, wrong)},
        "ia3": {"weight": torch.ones(out + 3)},
        "norm": {"w_norm": torch.ones(out, wrong)},
    }[kind]
    module, _ = build_module(key, tensors, "x.safetensors")
    mapping = map_network({key: module}, state)
    assert mapping.targets == [] and mapping.unmatched == [key]
    assert mapping.incompatible.startswith("1 layer(s) have the wrong size for this SD 1.x model (first: " + key)
