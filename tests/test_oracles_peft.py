"""Oracle: diffusers + PEFT, which we did not write, fuse a LoRA file into a tiny SD pipeline.

1. A PEFT LoRA adapter (random non-zero lora_B, lora_alpha != r, an alpha_pattern, rsLoRA on the
   text encoder) is saved with ``StableDiffusionPipeline.save_lora_weights`` (diffusers' own
   ``lora_adapter_metadata``), loaded into a fresh pipeline with ``load_lora_weights`` +
   ``set_adapters(weights=0.7)`` + ``fuse_lora``; every fused weight must equal W + 0.7·ΔW from
   load_network.
2. The same with ``use_dora=True`` at weight 1.0. (PEFT scales DoRA's low-rank part *inside* the
   norm, m_d·(W + w·sBA)/‖W + w·sBA‖, while the WebUI applies W + w·(W_dora − W); both agree at w = 1,
   so that is where DoRA is compared.)
3. A kohya-format LoRA/LoCon file (written by LyCORIS with kohya names) read by diffusers' own kohya
   converter (loaders/lora_conversion_utils.py) and fused at 0.7: a second, independent reading of
   the kohya names, ranks and alphas.
"""

from __future__ import annotations

import pytest
import torch
from support.tiny_models import KohyaTextEncoder, tiny_pipeline, tiny_text_encoder, tiny_unet

from lib_scheduled_lora.core.networks.loader import load_network

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2", "conv_shortcut"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def kohya_layers(pipe):
    """kohya base name -> (layer, weight before any LoRA) for the pipeline's UNet and text encoder."""
    layers = {}
    for component, prefix in ((pipe.unet, "lora_unet_"), (pipe.text_encoder, "lora_te_")):
        for name, module in component.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in name:
                path = name if prefix == "lora_unet_" or name.startswith("text_model.") else "text_model." + name
                layers[prefix + path.replace(".", "_")] = (module, module.weight.detach().clone())
    return layers


def fused_weight(module):
    return (module.get_base_layer() if hasattr(module, "get_base_layer") else module).weight.detach()


def fuse(pipe, path, weight):
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="oracle")
    pipe.set_adapters(["oracle"], adapter_weights=[weight])
    pipe.fuse_lora(components=["unet", "text_encoder"])


def compare(network, layers, weight, expected_count):
    assert len(network.modules) == expected_count
    assert network.unrecognised_keys == []
    for key, module in network.modules.items():
        layer, base = layers[key]
        fused = fused_weight(layer)
        assert not torch.equal(fused, base), f"diffusers did not apply {key}"
        expected = base + weight * module.weight_delta(base)
        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def save_peft_file(tmp_path, use_dora=False):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    unet_config = LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, alpha_pattern={"to_k": 2},
                             init_lora_weights=False, use_dora=use_dora)
    te_config = LoraConfig(r=2, lora_alpha=3, target_modules=TE_TARGETS, use_rslora=True, init_lora_weights=False)
    unet.add_adapter(unet_config)
    text_encoder.add_adapter(te_config)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict(),
        weight_name="peft.safetensors",
    )
    path = tmp_path / "peft.safetensors"
    count = sum(1 for _, m in unet.named_modules() if hasattr(m, "lora_A")) + sum(
        1 for _, m in text_encoder.named_modules() if hasattr(m, "lora_A"))
    return path, count


def test_peft_lora_fused_by_diffusers(tmp_path):
    path, count = save_peft_file(tmp_path)
    network = load_network(path)
    alphas = {m.alpha for m in network.modules.values()}
    assert alphas == {6.0, 2.0, 3.0}  # lora_alpha, the alpha_pattern for to_k, the text encoder's
    pipe = tiny_pipeline()
    layers = kohya_layers(pipe)
    fuse(pipe, path, 0.7)
    compare(network, layers, 0.7, count)


def test_peft_dora_fused_by_diffusers(tmp_path):
    path, count = save_peft_file(tmp_path, use_dora=True)
    network = load_network(path)
    assert sum(m.dora for m in network.modules.values()) == count - len(TE_TARGETS) * 2  # the UNet's
    pipe = tiny_pipeline()
    layers = kohya_layers(pipe)
    fuse(pipe, path, 1.0)
    compare(network, layers, 1.0, count)


def test_kohya_file_read_by_diffusers_converter(tmp_path):
    pytest.importorskip("lycoris")
    from lycoris import LycorisNetwork
    from safetensors.torch import save_file

    saved_prefix, saved_targets = LycorisNetwork.LORA_PREFIX, LycorisNetwork.TARGET_REPLACE_MODULE
    saved_names = LycorisNetwork.TARGET_REPLACE_NAME
    state = {}
    generator = torch.Generator().manual_seed(5)
    try:
        for root, prefix, targets in (
            (tiny_unet(), "lora_unet", ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]),
            (KohyaTextEncoder(tiny_text_encoder()), "lora_te", ["CLIPAttention", "CLIPMLP"]),
        ):
            LycorisNetwork.apply_preset({"target_module": targets, "target_name": [], "lora_prefix": prefix})
            network = LycorisNetwork(root, lora_dim=4, conv_lora_dim=2, alpha=2, conv_alpha=1.5, network_module="lora")
            network.apply_to()
            with torch.no_grad():
                for lora in network.loras:
                    for param in lora.parameters():
                        param.add_(torch.randn(param.shape, generator=generator) * 0.2)
            state.update({k: v.detach().contiguous() for k, v in network.state_dict().items()})
    finally:
        LycorisNetwork.LORA_PREFIX, LycorisNetwork.TARGET_REPLACE_MODULE = saved_prefix, saved_targets
        LycorisNetwork.TARGET_REPLACE_NAME = saved_names
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path))
    network = load_network(path)
    assert any(m.is_conv and m.down.shape[2:] == (3, 3) for m in network.modules.values())  # LoCon 3x3
    pipe = tiny_pipeline()
    layers = kohya_layers(pipe)
    fuse(pipe, path, 0.7)
    compare(network, layers, 0.7, len(state) // 3)
