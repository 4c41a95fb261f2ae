"""The engine on accelerators and under offloading, tested on the CPU.

An accelerator is simulated by declaring the CPU not to be host memory
(``lib_scheduled_lora.core.live.HOST_MEMORY``): the engine then places weights as it does on a GPU
(merged values written in place, originals copied to host RAM), and its own accounting tells
which bytes it holds where. Offloading is real: ``module.to()`` mid-generation, forward hooks that
move a module between dtypes, and accelerate's own ``cpu_offload`` (parameters on the meta
device between forwards).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from support.sd_layouts import kohya_lora_state, tiny_sd
from torch import nn

from lib_scheduled_lora.core import engine as engine_module
from lib_scheduled_lora.core import live as live_module
from lib_scheduled_lora.core.combine import Term, combine
from lib_scheduled_lora.core.engine import EngineSettings, ScheduledNetwork, ScheduledWeights
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.core.schedule import parse_schedule


def _model(dtype=torch.float32) -> nn.ModuleDict:
    return nn.ModuleDict(copy.deepcopy(tiny_sd("sd1")).components).to(dtype)


def _network(tmp_path, seed=0):
    path = tmp_path / f"n{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in kohya_lora_state(tiny_sd("sd1"), seed=seed).items()}, str(path))
    return load_network(path, name=f"n{seed}")


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def accelerator(monkeypatch):
    """Weights on the CPU are placed as on a GPU (the CPU is not 'host memory' for the engine)."""
    monkeypatch.setattr(live_module, "HOST_MEMORY", frozenset())
    monkeypatch.setattr(engine_module, "is_host_memory", live_module.is_host_memory)


def _targeted_bytes(weights: ScheduledWeights) -> int:
    return sum(t.module.delta_numel() * 4 for t in weights.iter_targets())  # upper bound, fp32


@pytest.mark.parametrize("schedule", ["1", "0@0.3:1", "0@0,1@1"])
def test_no_copy_of_the_weights_on_the_device_by_default(tmp_path, accelerator, schedule):
    """Default settings on an accelerator: merge buffers 0 bytes, ΔW held 0 bytes, originals only
    in host RAM (role "backup" on "cpu"), and nothing left after the generation."""
    model = _model(torch.float16)
    before = _snapshot(model)
    net = ScheduledNetwork(_network(tmp_path), parse_schedule("1"), parse_schedule(schedule))
    seen: list[dict] = []
    with ScheduledWeights(model, [net], EngineSettings(mode="merge")) as weights:
        weights.set_position("te", 0, 8)
        for i in range(8):
            weights.set_position("unet", i, 8)
            seen.append(weights.memory())
        assert weights.stats.layer_updates > 0
    for memory in seen:
        assert not any(role in ("merge buffer", "ΔW") for role, _ in memory), memory
        assert set(memory) <= {("backup", "cpu")}
    assert weights.memory() == {}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_in_place_updates_equal_the_kernel_from_the_true_base_at_every_step(tmp_path, accelerator):
    """A 150-step ramp in fp16 and bf16, written in place from the host copy: at every evaluation
    each weight is exactly combine(original, m·ΔW) (no add-then-subtract drift)."""
    network = _network(tmp_path)
    for dtype in (torch.float16, torch.bfloat16):
        model = _model(dtype)
        originals = _snapshot(model)
        ramp = parse_schedule("0@0,1.5@0.5,-1@1")
        net = ScheduledNetwork(network, parse_schedule("1"), ramp)
        with ScheduledWeights(model, [net], EngineSettings(mode="merge")) as weights:
            targets = [t for t in weights.iter_targets() if t.component == "unet"]
            deltas = {t.weight: t.module.weight_delta(originals[t.weight]) for t in targets}  # at unit strength
            for i in range(150):
                weights.set_position("unet", i, 150)
                m = ramp.at(i, 150)
                for target in targets:
                    expected = combine(originals[target.weight], [Term(m, None, deltas[target.weight])])
                    assert torch.equal(model.get_parameter(target.weight).data, expected), (dtype, i, target.weight)
        for key, value in model.state_dict().items():
            assert torch.equal(value, originals[key])


def test_device_budget_keeps_originals_on_the_device_within_free_memory(tmp_path, accelerator, monkeypatch):
    """A user budget trades memory for speed, but never more than the device can spare now."""
    model = _model(torch.float16)
    net = ScheduledNetwork(_network(tmp_path), parse_schedule("1"), parse_schedule("0@0,1@1"))
    layer_bytes = max(p.numel() * p.element_size() for p in model.parameters())
    free = engine_module.DEVICE_HEADROOM + 3 * layer_bytes  # room for about three layers
    monkeypatch.setattr(engine_module, "free_device_memory", lambda device: int(free))
    with ScheduledWeights(model, [net], EngineSettings(mode="merge", device_budget_mb=1024)) as weights:
        weights.set_position("te", 0, 4)
        for i in range(4):
            weights.set_position("unet", i, 4)
        memory = weights.memory()
        on_device = sum(v for (role, device), v in memory.items() if role in ("backup", "ΔW") and device == "cpu")
        # the simulated device is the CPU: originals/ΔW kept "on the device" are bounded by free memory
        assert 0 < on_device <= 3 * layer_bytes + _targeted_bytes(weights)
    monkeypatch.setattr(engine_module, "free_device_memory", lambda device: int(engine_module.DEVICE_HEADROOM))
    with ScheduledWeights(model, [net], EngineSettings(mode="merge", device_budget_mb=1024)) as weights:
        for i in range(4):
            weights.set_position("unet", i, 4)
        assert not any(role == "ΔW" for role, _ in weights.memory())  # no room: nothing kept there


@pytest.mark.parametrize("mode", ["merge", "auto", "bypass"])
def test_module_moved_mid_generation_comes_back_where_it_is_now(tmp_path, mode):
    """``.to(float64)`` in the middle of a generation (a host's offload or dtype switch): updates
    after the move are exact in float64, and restore leaves float64 weights and biases holding the
    original values."""
    model = _model()
    before = _snapshot(model)
    net = ScheduledNetwork(_network(tmp_path), parse_schedule("0.5"), parse_schedule("0@0,1@1"))
    with ScheduledWeights(model, [net], EngineSettings(mode=mode)) as weights:
        weights.set_position("te", 0, 6)
        for i in range(6):
            if i == 3:
                model.to(torch.float64)
            weights.set_position("unet", i, 6)
        if mode == "merge":
            m = net.unet.at(5, 6)
            for target in weights.iter_targets():
                if target.component == "unet":
                    expected = combine(before[target.weight].double(), [Term(m, target.module)])
                    assert torch.equal(model.get_parameter(target.weight).data, expected)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float64, key
        assert torch.equal(value, before[key].double()), key


def _dtype_mover(module: nn.Module):
    """Forward hooks that keep ``module`` in float64 between forwards and float32 during them (a
    host moving a module around its forward, as offloading does)."""

    def before(mod, args):
        mod.to(torch.float32)

    def after(mod, args, output):
        mod.to(torch.float64)

    module.to(torch.float64)
    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def test_pipeline_whose_modules_move_between_dtypes_gives_the_same_image(tmp_path):
    from support.tiny_models import tiny_pipeline

    from lib_scheduled_lora.hosts.diffusers import attach
    from lib_scheduled_lora.hosts.samplers import make_scheduler

    pipe = _pipeline_with_network(tmp_path)
    pipe, network = pipe

    def generate():
        pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
        with torch.no_grad():
            return pipe("a cat", num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(3)).images

    net = ScheduledNetwork(network, parse_schedule("0.7"), parse_schedule("0@0,1@1"))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with attach(pipe, [net], EngineSettings(mode="merge")):
        plain = generate()
    handles = _dtype_mover(pipe.unet)
    try:
        with attach(pipe, [net], EngineSettings(mode="merge")):
            moved = generate()
    finally:
        for handle in handles:
            handle.remove()
    assert (moved == plain).all()
    for key, value in pipe.unet.state_dict().items():
        assert value.dtype == torch.float64 and torch.equal(value, before[key].double()), key
    del tiny_pipeline


def _pipeline_with_network(tmp_path):
    from support.tiny_models import tiny_clip_config, tiny_pipeline
    from transformers import CLIPTextModel

    config = tiny_clip_config()
    config.vocab_size, config.bos_token_id, config.eos_token_id = 49408, 49406, 49407
    torch.manual_seed(0)
    pipe = tiny_pipeline(text_encoder=CLIPTextModel(config).eval())
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(5)
    state = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, nn.Linear) and "attn" in name:
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=gen) * 0.5
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=gen) * 0.5
            state[f"{key}.alpha"] = torch.tensor(4.0)
        if isinstance(module, nn.Conv2d) and "resnets" in name and module.kernel_size == (3, 3):
            key = "lora_unet_" + name.replace(".", "_")
            fan = module.in_channels * 9
            for side in ("w1", "w2"):
                state[f"{key}.hada_{side}_a"] = torch.randn(module.out_channels, 2, generator=gen) * 0.5
                state[f"{key}.hada_{side}_b"] = torch.randn(2, fan, generator=gen) / fan**0.5
    path = tmp_path / "net.safetensors"
    save_file(state, str(path))
    return pipe, load_network(path, name="net")


@pytest.mark.parametrize("schedule", ["0.8", "0@0.5:1", "0@0,1@1"])
def test_accelerate_sequential_offload_gives_the_same_image(tmp_path, schedule):
    """accelerate's cpu_offload keeps the UNet's parameters on the meta device between forwards:
    there is no weight to write, so the networks (LoRA attention layers and LoHa convolutions)
    act in the layers' forwards. Same image as without offloading, within float32 rounding; the
    offloaded weights are never touched."""
    from accelerate import cpu_offload

    from lib_scheduled_lora.hosts.diffusers import attach
    from lib_scheduled_lora.hosts.samplers import make_scheduler

    pipe, network = _pipeline_with_network(tmp_path)

    def generate():
        pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
        with torch.no_grad():
            return pipe("a cat", num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(3)).images

    net = ScheduledNetwork(network, parse_schedule("1"), parse_schedule(schedule))
    base = generate()
    with attach(pipe, [net], EngineSettings(mode="merge")):
        plain = generate()
    originals = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    with attach(pipe, [net], EngineSettings(mode="merge")):
        offloaded = generate()
    effect = abs(plain - base).max()
    assert effect > 1e-3  # the networks did act
    assert abs(offloaded - plain).max() < 0.02 * effect  # float32 rounding of W·x + Δy vs (W + ΔW)·x
    hook_maps = {}
    for name, module in pipe.unet.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "weights_map", None) is not None:
            for key in module.state_dict(keep_vars=True):
                if "." not in key:
                    hook_maps[f"{name}.{key}" if name else key] = hook.weights_map[key]
    assert hook_maps and all(torch.equal(hook_maps[k], originals[k]) for k in hook_maps)
    with torch.no_grad():
        again = generate()
    assert abs(again - base).max() < 1e-5  # nothing of ours is left in the offloaded model


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/device_checks.sh where one is lent)")


@CUDA
@pytest.mark.parametrize("offload", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
@pytest.mark.parametrize("schedule", ["0.8", "0@0.5:1", "0@0,1@1"])
def test_diffusers_offload_on_cuda_gives_the_same_image(tmp_path, offload, schedule):
    """On a real GPU: diffusers' own offloading (whole models moved per call, or parameters streamed
    per forward) gives the image of the same generation without offloading, and leaves the
    weights as they were."""
    from lib_scheduled_lora.hosts.diffusers import attach
    from lib_scheduled_lora.hosts.samplers import make_scheduler

    pipe, network = _pipeline_with_network(tmp_path)
    pipe.to("cuda")
    net = ScheduledNetwork(network, parse_schedule("1"), parse_schedule(schedule))

    def generate():
        pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
        with torch.no_grad():
            return pipe("a cat", num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(3)).images

    base = generate()
    with attach(pipe, [net]):
        plain = generate()
    originals = {k: v.detach().cpu().clone() for k, v in pipe.unet.state_dict().items()}
    pipe.to("cpu")
    getattr(pipe, offload)()
    with attach(pipe, [net]):
        offloaded = generate()
    effect = abs(plain - base).max()
    assert effect > 1e-3
    assert abs(offloaded - plain).max() < 0.02 * effect
    assert abs(generate() - base).max() < 1e-3  # nothing of ours left behind
    if offload == "enable_model_cpu_offload":
        for key, value in pipe.unet.state_dict().items():
            assert torch.equal(value.detach().cpu(), originals[key]), key

