"""Oracle: files written by the lycoris-lora package, checked against its modules' own forward.

For every algorithm, LyCORIS wraps the layers of a tiny diffusers UNet (real SD layer names), its
factors are set to random non-zero values (LyCORIS zero-inits one side), and ``save_weights`` writes a
genuine LyCORIS file. We load it with ``load_network`` and check, layer by layer, that

    layer(x; W + m·ΔW, b + m·Δb)  ==  the LyCORIS module's forward(x) with multiplier m.

Known traps in lycoris-lora 4.1.3, deliberately not used as oracles: ``get_diff_weight`` / ``merge_to``
apply alpha/rank twice for LoHa and factorised LoKr, and ``lycoris.functional.lokr`` mis-scales Tucker
LoKr. The module *forward* (rebuild path) is correct and is what we compare with.

Discrepancy found (documented, not a bug of ours): for DoRA, LyCORIS's forward with multiplier m
computes W' = V + m·(m_d·V/‖V‖ − V) with V = W + ΔW, i.e. the low-rank part is applied in full at any
m (at m = 0 the layer is still W + ΔW). The A1111 WebUI computes ΔW_dora = m_d·V/‖V‖ − W and applies
W + m·ΔW_dora (network.py finalize_updown: DoRA first, then ``* self.multiplier()``), which is what we
implement, so DoRA is compared at m = 1 only, and at m ≠ 1 against W + m·(W'(1) − W).
"""

from __future__ import annotations

import pytest
import torch
from support.tiny_models import KohyaTextEncoder, apply_layer, layer_inputs, tiny_text_encoder, tiny_unet

from lib_scheduled_lora.core.networks.loader import load_network

lycoris = pytest.importorskip("lycoris")
from lycoris import LycorisNetwork  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

TOL = 2e-5  # relative to the largest output value; fp32 rebuilds in a different order
UNET_TARGETS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D"]


@pytest.fixture(autouse=True)
def restore_lycoris_presets():
    """LycorisNetwork.apply_preset sets class attributes; put them back for other tests."""
    saved = {name: getattr(LycorisNetwork, name) for name in
             ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "MODULE_ALGO_MAP",
              "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")}
    yield
    for name, value in saved.items():
        setattr(LycorisNetwork, name, value)


def randomise(network, seed=5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            for name, param in lora.named_parameters():
                noise = torch.randn(param.shape, generator=generator) * 0.2
                if name == "dora_scale":
                    param.mul_(1 + noise.abs())  # magnitudes stay positive
                else:
                    param.add_(noise)
                # values exactly representable in fp16, so that an fp16 file holds the same numbers
                param.copy_(param.half().float())


def build(root, prefix, targets, algo, path, dtype=torch.float32, dim=4, conv_dim=4, **kwargs):
    """Wrap ``root`` with LyCORIS, randomise, save with LyCORIS's own save_weights."""
    base = {
        module: (module.weight.detach().clone(), None if getattr(module, "bias", None) is None else module.bias.detach().clone())
        for module in root.modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
    }
    LycorisNetwork.apply_preset({"target_module": targets, "target_name": [], "lora_prefix": prefix})
    network = LycorisNetwork(
        root, multiplier=1.0, lora_dim=dim, conv_lora_dim=conv_dim, alpha=2, conv_alpha=3, network_module=algo, **kwargs
    )
    network.apply_to()
    randomise(network)
    network.save_weights(str(path), dtype, {"ss_network_module": "lycoris.kohya"})
    return network, base


def check_against_forward(network, base, ours, multipliers=(1.0, 0.6)):
    assert len(ours.modules) == len(network.loras) > 0
    assert ours.unrecognised_keys == []
    for lora in network.loras:
        layer = lora.org_module[0]
        weight, bias = base[layer]
        module = ours.modules[lora.lora_name]
        x = layer_inputs(layer, batch=1)
        delta, bias_delta = module.weight_delta(weight), module.bias_delta(bias)
        for m in multipliers:
            lora.multiplier = m
            with torch.no_grad():
                expected = lora(x)
            new_bias = bias if bias_delta is None else (bias_delta * m if bias is None else bias + m * bias_delta)
            got = apply_layer(layer, x, weight + m * delta, new_bias)
            scale = expected.abs().max().item() + 1e-6
            error = (got - expected).abs().max().item() / scale
            assert error < TOL, f"{lora.lora_name} ({type(lora).__name__}, m={m}): relative error {error:.2e}"


def keys_of(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {key.split(".", 1)[1] for key in handle.keys()}


CASES = {
    # id: (algo, LycorisNetwork kwargs, suffixes the file must contain so that the variant is covered)
    "lora": ("lora", {}, {"lora_up.weight", "lora_down.weight", "alpha"}),
    "locon-tucker": ("lora", {"use_tucker": True}, {"lora_mid.weight"}),
    "loha": ("loha", {}, {"hada_w1_a", "hada_w2_b"}),
    "loha-tucker": ("loha", {"use_tucker": True}, {"hada_t1", "hada_t2"}),
    "lokr": ("lokr", {"dim": 2, "conv_dim": 2}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "lokr-tucker": ("lokr", {"dim": 2, "conv_dim": 2, "use_tucker": True}, {"lokr_t2"}),
    "lokr-both-factorised": ("lokr", {"dim": 1, "conv_dim": 1, "decompose_both": True}, {"lokr_w1_a", "lokr_w1_b"}),
    "lokr-full-matrix": ("lokr", {"full_matrix": True}, {"lokr_w1", "lokr_w2"}),
    "ia3-output": ("ia3", {}, {"weight", "on_input"}),
    "ia3-input": ("ia3", {"train_on_input": True}, {"weight", "on_input"}),
    "full": ("full", {}, {"diff", "diff_b"}),
    "norm": ("lora", {"train_norm": True}, {"w_norm", "b_norm"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_file_matches_lycoris_forward(tmp_path, case):
    algo, kwargs, must_have = CASES[case]
    unet = tiny_unet()
    path = tmp_path / f"{case}.safetensors"
    # The down blocks hold every layer type (attention linears, 1x1 proj convs, 3x3 resnet convs,
    # time-embedding linears, a 1x1 shortcut, the downsampler), under their real kohya names.
    network, base = build(unet.down_blocks, "lora_unet_down_blocks", UNET_TARGETS, algo, path, **kwargs)
    assert must_have <= keys_of(path)
    ours = load_network(path)
    assert all(key.startswith("lora_unet_down_blocks_") for key in ours.modules)
    check_against_forward(network, base, ours)


@pytest.mark.parametrize(
    ("algo", "kwargs"),
    [
        ("lora", {"weight_decompose": True}),
        ("lora", {"weight_decompose": True, "wd_on_output": False, "use_tucker": True}),
        ("loha", {"weight_decompose": True}),
        ("lokr", {"weight_decompose": True, "wd_on_output": False, "dim": 2, "conv_dim": 2}),
    ],
    ids=["dora-per-output", "dora-per-input-tucker", "doha", "dokr-per-input"],
)
def test_lycoris_dora(tmp_path, algo, kwargs):
    kwargs = dict(kwargs)
    kwargs["wd_on_out"] = kwargs.pop("wd_on_output", True)
    unet = tiny_unet()
    path = tmp_path / "dora.safetensors"
    network, base = build(unet.down_blocks, "lora_unet_down_blocks", UNET_TARGETS, algo, path, **kwargs)
    ours = load_network(path)
    assert all(module.dora for module in ours.modules.values())
    check_against_forward(network, base, ours, multipliers=(1.0,))
    # m != 1: the WebUI's linear rule, W + m·(W_dora − W), built from LyCORIS's own m = 1 output
    for lora in network.loras[:6]:
        layer = lora.org_module[0]
        weight, bias = base[layer]
        x = layer_inputs(layer, batch=1)
        lora.multiplier = 1.0
        with torch.no_grad():
            full, plain = lora(x), apply_layer(layer, x, weight, bias)
        got = apply_layer(layer, x, weight + 0.6 * ours.modules[lora.lora_name].weight_delta(weight), bias)
        torch.testing.assert_close(got, plain + 0.6 * (full - plain), atol=1e-4, rtol=1e-4)


def test_fp16_file_and_text_encoder_and_lycoris_prefix(tmp_path):
    """A half-precision LyCORIS file (computed in fp32), a text encoder, and the default prefix."""
    text_encoder = KohyaTextEncoder(tiny_text_encoder())
    path = tmp_path / "te.safetensors"
    network, base = build(text_encoder, "lora_te", ["CLIPAttention", "CLIPMLP"], "loha", path, dtype=torch.float16)
    ours = load_network(path)
    assert any(key == "lora_te_text_model_encoder_layers_1_self_attn_q_proj" for key in ours.modules)
    assert all(m.w1a.dtype == torch.float16 for m in ours.modules.values())
    check_against_forward(network, base, ours)

    unet = tiny_unet()
    path = tmp_path / "lycoris.safetensors"
    # LyCORIS's default prefix "lycoris" (whole UNet wrapped): read as the UNet's kohya names
    network, base = build(unet, "lycoris", ["Transformer2DModel"], "lora", path)
    ours = load_network(path)
    for lora in network.loras:
        assert lora.lora_name.startswith("lycoris_")
        lora.lora_name = "lora_unet_" + lora.lora_name.removeprefix("lycoris_")
    check_against_forward(network, base, ours)
