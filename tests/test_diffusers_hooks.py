"""attach(): scheduled networks on a real (tiny) diffusers StableDiffusionPipeline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from support.tiny_models import tiny_clip_config, tiny_pipeline

from lib_scheduled_lora.core.engine import EngineSettings, ScheduledNetwork
from lib_scheduled_lora.core.merge import merge_networks
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.core.schedule import Schedule, parse_schedule
from lib_scheduled_lora.hosts.diffusers import attach
from lib_scheduled_lora.hosts.samplers import make_scheduler

STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    from transformers import CLIPTextModel

    config = tiny_clip_config()
    config.vocab_size, config.bos_token_id, config.eos_token_id = 49408, 49406, 49407  # the real tokenizer's ids
    torch.manual_seed(0)
    pipe = tiny_pipeline(text_encoder=CLIPTextModel(config).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def network(pipe, tmp_path_factory):
    """A kohya LoRA on every attention projection of the UNet and the text encoder."""
    gen = torch.Generator().manual_seed(5)
    state = {}
    for prefix, component in (("lora_unet_", pipe.unet), ("lora_te_", pipe.text_encoder)):
        for name, module in component.named_modules():
            if not isinstance(module, torch.nn.Linear) or not any(k in name for k in ("attn", "to_", "proj")):
                continue
            path = name if prefix == "lora_unet_" or name.startswith("text_model.") else "text_model." + name
            key = prefix + path.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=gen) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=gen) * 0.3
            state[f"{key}.alpha"] = torch.tensor(4.0)
    path = tmp_path_factory.mktemp("net") / "style.safetensors"
    save_file(state, str(path))
    return load_network(path, name="style")


def _generate(pipe, sampler="euler", steps=STEPS, seed=3):
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    with torch.no_grad():
        return pipe("a cat", num_inference_steps=steps, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images


def _snapshot(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def _net(network, te, unet):
    return ScheduledNetwork(network, te=parse_schedule(te), unet=parse_schedule(unet))


def test_heun_evaluations_are_placed_by_noise_level(pipe, network):
    with attach(pipe, [_net(network, "1", "0@0.5:1")]) as attached:
        _generate(pipe, "heun")
    assert attached.positions == [0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_schedules_change_the_image_and_everything_is_restored(pipe, network):
    before = _snapshot(pipe)
    base = _generate(pipe)
    with attach(pipe, [_net(network, "1", "1")]):
        full = _generate(pipe)
    with attach(pipe, [_net(network, "1", "0@0.5:1")]):
        scheduled = _generate(pipe)
    after = _generate(pipe)
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(pipe).items())
    assert (base == after).all()  # the next image without LoRA is the first one, to the bit
    assert not (full == base).all() and not (scheduled == base).all() and not (scheduled == full).all()


def test_zero_schedule_is_the_base_model(pipe, network):
    base = _generate(pipe)
    with attach(pipe, [_net(network, "0", "0")]):
        assert (_generate(pipe) == base).all()


def test_constant_schedule_matches_a_static_merge(pipe, network):
    """Oracle: the same network baked in once by merge_networks (the host's static path)."""
    with attach(pipe, [_net(network, "0.7", "0.7")], EngineSettings(mode="merge")):
        scheduled = _generate(pipe)
    state = {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    merged = merge_networks(state, [(network, 0.7)]).tensors
    before = _snapshot(pipe)
    try:
        with torch.no_grad():
            for key, value in merged.items():
                component, _, name = key.partition(".")
                getattr(pipe, component).get_parameter(name).copy_(value)
        static = _generate(pipe)
    finally:
        with torch.no_grad():
            for key, value in before.items():
                component, _, name = key.partition(".")
                getattr(pipe, component).state_dict()[name].copy_(value)
    assert (scheduled == static).all()


def test_an_exception_during_sampling_restores_the_weights(pipe, network):
    before = _snapshot(pipe)

    def explode(pipe_, step, timestep, kwargs):
        if step == 2:
            raise RuntimeError("interrupted")
        return kwargs

    with pytest.raises(RuntimeError, match="interrupted"), attach(pipe, [_net(network, "0.5", "0@0,1@1")]):
        pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
        pipe("a cat", num_inference_steps=STEPS, output_type="np", callback_on_step_end=explode)
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(pipe).items())


def test_text_encoder_gets_the_te_schedule(pipe, network):
    with attach(pipe, [ScheduledNetwork(network, te=Schedule.constant(0.25), unet=Schedule.constant(0.0))]) as attached:
        _generate(pipe)
        assert attached.te_multipliers == {"style": 0.25}
        assert {e.multipliers["style"] for e in attached.trace} == {0.0}


def test_repeated_attaches_reuse_the_pipelines_delta_cache(pipe, network, monkeypatch):
    """attach keeps its ΔW cache with the pipeline: a second generation with the same network
    objects (as a NetworkLibrary keeps them) builds no ΔW again."""
    from lib_scheduled_lora.core.networks.modules import LoraModule

    fresh = load_network(network.path, name="style")  # new objects: nothing cached for them yet
    calls = []
    original = LoraModule.weight_delta
    monkeypatch.setattr(LoraModule, "weight_delta", lambda self, base: calls.append(self.key) or original(self, base))
    with attach(pipe, [_net(fresh, "1", "0@0,1@1")], EngineSettings(mode="merge")):
        _generate(pipe)
    built = len(calls)
    assert built == len(fresh.modules)
    with attach(pipe, [_net(fresh, "0.5", "0@0.5:1")], EngineSettings(mode="merge")):
        _generate(pipe)
    assert len(calls) == built
