"""The Forge adapter against the host's call order and objects, without a WebUI, for each of the
three patcher layouts (Forge main, Forge Neo 2026-08, Forge Neo 2026-09).

``ForgeP.process_images`` replays Forge's ``modules/processing.py: process_images_inner`` (seen in
both hosts, see the Forge notes §7): scripts.process -> p.init -> per batch (before_process_batch,
parse, extra_networks.activate -> the host Lora's ``load_networks`` (clone the patchers,
``add_patches``), ``forge_objects`` reset from ``forge_objects_after_applying_lora``, setup_conds via
get_conds_with_caching -> ``sd_model.get_learned_conditioning`` (loads the text-encoder patcher:
Forge writes its patches now, then encodes), the reset again, process_before_every_sampling,
sampler.sample -> ``sampling_prepare`` (loads the UNet patcher) -> launch_sampling -> func ->
on_cfg_denoiser -> the UNet's forward) -> hires (Forge main calls process_before_every_sampling
twice, around a reset) -> postprocess. The patchers are the recorded ones in ``support.forge_*``,
over real torch weights of a tiny SD model; what a layer's forward computes with is the layout's
own ``get_weight_and_bias``.
"""

from __future__ import annotations

import types
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from support import forge_main, forge_neo_2026_08, forge_neo_2026_09
from support.forge_common import forge_modules
from support.random_networks import Layer, constant, random_network
from support.sd_layouts import tiny_sd
from test_host_a1111 import (
    FakeSampler,
    InterruptedException,
    parse_prompts,
)

from lib_scheduled_lora.core.naming import map_network
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.core.session import Runtime
from lib_scheduled_lora.errors import (
    HostLayoutError,
    MissingNetworkError,
    ScheduleSyntaxError,
    UnsupportedModelError,
)
from lib_scheduled_lora.hosts import forge

LAYOUTS = {
    "forge-main": (forge_main, forge.Layout.FORGE_MAIN),
    "neo-2026-08": (forge_neo_2026_08, forge.Layout.NEO_2026_08),
    "neo-2026-09": (forge_neo_2026_09, forge.Layout.NEO_2026_09),
}
UNET_KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
TE_KEY = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


# -- the host ----------------------------------------------------------------------------------


class ForgeObjects:  # backend/diffusion_engine/base.py
    def __init__(self, unet, clip):
        self.unet, self.clip = unet, clip

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip)


class Clip:  # backend/patcher/clip.py: CLIP
    def __init__(self, cond_stage_model, patcher):
        self.cond_stage_model, self.patcher = cond_stage_model, patcher

    def clone(self):
        return Clip(self.cond_stage_model, self.patcher.clone())


def _lora_files(tmp_path, kmodel, clip):
    """Two kohya LoRAs on the same layers (ldm names, as the host reads them): "wday" and "other"."""
    layers = []
    for name, param in list(kmodel.named_parameters()) + list(clip.named_parameters()):
        if not name.endswith(".weight") or param.ndim != 2 or "attn1" not in name and "self_attn" not in name:
            continue
        if name.startswith("diffusion_model."):
            key = "lora_unet_" + name[len("diffusion_model.") : -len(".weight")].replace(".", "_")
        else:
            key = "lora_te_" + name.split(".transformer.", 1)[1][: -len(".weight")].replace(".", "_")
        layers.append(Layer(key, tuple(param.shape)))
    paths = {}
    for seed, name in enumerate(("wday", "other")):
        tensors = random_network(layers, "lora", rank=2, seed=seed, std=constant(0.3), alpha=lambda r: 1.0)
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(paths[name]))
    return paths


class World:
    """One Forge host: the model objects, the builtin Lora (load_networks), the memory manager."""

    def __init__(self, tmp_path, layout_name="forge-main", online=False, family="sd1", builtin_scheduler=False):
        self.host_module, self.layout = LAYOUTS[layout_name]
        kmodel, encoders = forge_modules(tiny_sd("sd1"))
        self.kmodel, self.encoders = kmodel, encoders
        self.original_state = {k: v.clone() for k, v in self.state().items()}
        patcher = self.host_module.ModelPatcher
        unet, clip = patcher(kmodel), Clip(encoders, patcher(encoders))
        self.sd_model = SimpleNamespace(
            forge_objects=ForgeObjects(unet, clip),
            forge_objects_original=ForgeObjects(unet, clip),
            forge_objects_after_applying_lora=ForgeObjects(unet, clip),
            current_lora_hash=str([]),
            sd_checkpoint_info=SimpleNamespace(filename="tiny.safetensors"),
            get_learned_conditioning=self.get_learned_conditioning,
        )
        setattr(self.sd_model, {"sd1": "is_sd1", "flux": "is_flux"}[family], True)
        self.online = online
        self.loaded: dict[int, object] = {}  # memory_management: the patcher loaded per model
        self.paths = _lora_files(tmp_path, kmodel, encoders)
        (tmp_path / "old.pt").write_bytes(b"not read")
        aliases = {name: SimpleNamespace(filename=str(path)) for name, path in self.paths.items()}
        aliases["old"] = SimpleNamespace(filename=str(tmp_path / "old.pt"))
        self.networks = SimpleNamespace(available_network_aliases=aliases, list_available_networks=lambda: None)
        opts = SimpleNamespace(scheduled_lora_mode="merge", scheduled_lora_cache_mb=64)
        self.shared = SimpleNamespace(sd_model=self.sd_model, opts=opts)
        self.builtin_calls: list = []
        self.extra_networks = SimpleNamespace(
            extra_network_registry={"lora": SimpleNamespace(name="lora", activate=self.lora_activate, deactivate=lambda p: None)},
            extra_network_aliases={},
        )
        backend = forge.ForgeBackend(
            load_lora=self.host_module.load_lora,
            unet_key_map=self.host_module.unet_key_map,
            clip_key_map=self.host_module.clip_key_map,
            merge=self.host_module.merge_lora_to_weight,
            load_model=self.load_model_gpu,
            online_setting=lambda: self.online,
        )
        self.host = forge.ForgeHost(self.shared, networks=lambda: self.networks)
        self.runtime = Runtime(self.host)
        self.integration = forge.ForgeIntegration(
            self.runtime, self.extra_networks, None, backend, builtin_scheduler=lambda: builtin_scheduler
        )
        self.unet_log: list = []
        self.te_log: list = []

    # memory_management.load_model_gpu / load_models_gpu: a patcher already loaded is skipped
    def load_model_gpu(self, patcher):
        if self.loaded.get(id(patcher.model)) is patcher:
            return
        self.loaded[id(patcher.model)] = patcher
        patcher.load()

    def state(self):
        out = {f"unet.{k}": v for k, v in self.kmodel.state_dict().items()}
        out.update({f"clip.{k}": v for k, v in self.encoders.state_dict().items()})
        return out

    def backups(self):
        objects = self.sd_model.forge_objects
        out = {}
        for patcher in (objects.unet, objects.clip.patcher):
            backup = patcher.model.lora_loader.backup if self.layout is forge.Layout.FORGE_MAIN else patcher.backup
            for key, value in backup.items():
                out[key] = getattr(value, "weight", value).clone()
        return out

    # the builtin Lora: extra_networks_lora.py activate -> networks.load_networks
    def lora_activate(self, p, params_list):
        names, te, unet = [], [], []
        for params in params_list:
            names.append(params.positional[0])
            te.append(float(params.positional[1]) if len(params.positional) > 1 else 1.0)
            unet.append(float(params.positional[2]) if len(params.positional) > 2 else te[-1])
        self.builtin_calls.append(list(zip(names, te, unet)))
        online = forge.host_on_the_fly(self.layout, self.online, self.kmodel.storage_dtype)
        targets = [[str(self.paths[n]), u, t, online] for n, t, u in zip(names, te, unet)]
        if str(targets) == self.sd_model.current_lora_hash:
            return
        self.sd_model.current_lora_hash = str(targets)
        objects = self.sd_model.forge_objects
        objects.unet, objects.clip = self.sd_model.forge_objects_original.unet, self.sd_model.forge_objects_original.clip
        for filename, strength_model, strength_clip, online_mode in targets:
            from safetensors.torch import load_file

            lora = load_file(filename)
            lora_unet, rest = self.host_module.load_lora(lora, self.host_module.unet_key_map(self.kmodel, {}))
            lora_clip, rest = self.host_module.load_lora(rest, self.host_module.clip_key_map(self.encoders, {}))
            unet, clip = objects.unet.clone(), objects.clip.clone()
            unet.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model, online_mode=online_mode)
            clip.patcher.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip, online_mode=online_mode)
            objects.unet, objects.clip = unet, clip
        self.sd_model.forge_objects_after_applying_lora = objects.shallow_copy()

    def activate(self, p, data):
        registry = self.extra_networks.extra_network_registry
        params = data.get("lora", [])
        registry["lora"].activate(p, params)

    # sd15.py: get_learned_conditioning
    def get_learned_conditioning(self, prompts):
        self.load_model_gpu(self.sd_model.forge_objects.clip.patcher)
        self.te_log.append(self.effective(self.encoders, TE_KEY))
        return object()

    def effective(self, root, key):
        module = root.get_submodule(key.rpartition(".")[0])
        return self.host_module.get_weight_and_bias(module).detach().clone()

    def unet_forward(self):
        unet = self.kmodel.diffusion_model
        for hook in list(unet._forward_pre_hooks.values()):
            assert hook(unet, (torch.zeros(1),)) is None

    def weight(self, name):
        return self.effective(self.kmodel, UNET_KEY)


class ForgeSampler(FakeSampler):
    """sd_samplers_kdiffusion.py: sampling_prepare (load the UNet patcher) before launch_sampling."""

    def __init__(self, kind, log, world):
        super().__init__(kind, log)
        self.world = world

    def sample(self, p, x, steps=None):
        self.world.load_model_gpu(p.sd_model.forge_objects.unet)
        return super().sample(p, x, steps)

    def sample_img2img(self, p, x, steps, denoise):
        self.world.load_model_gpu(p.sd_model.forge_objects.unet)
        return super().sample_img2img(p, x, steps, denoise)


class ForgeP:
    def __init__(self, world, prompt, steps=8, sampler="euler", hr=False, hr_steps=4, fail=None):
        self.world, self.prompt, self.steps, self.sampler_kind = world, prompt, steps, sampler
        self.enable_hr, self.hr_prompt, self.hr_steps, self.fail = hr, prompt, hr_steps, fail
        self.batch_size, self.n_iter = 1, 1
        self.extra_generation_params, self.comments = {}, []
        self.is_hr_pass = False
        self.sd_model = world.sd_model
        self.model_wrap = SimpleNamespace(
            on_cfg_denoiser=world.integration.on_cfg_denoiser,
            other_denoiser_callbacks=[],
            unet_forward=world.unet_forward,
            weight=world.weight,
        )

    def comment(self, text):
        self.comments.append(text)

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None):
        return (tuple(required_prompts), steps, hires_steps, repr({k: [x.items for x in v] for k, v in extra_network_data.items()}))

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        key = self.cached_params(required_prompts, steps, extra_network_data, hires_steps)
        for cache in caches:
            if cache[0] == key:
                return cache[1]
        caches[0][1] = function(self.world.sd_model, required_prompts, steps, hires_steps)  # Neo: 4 arguments
        caches[0][0] = key
        return caches[0][1]

    @staticmethod
    def te_function(model, prompts, steps, hires_steps=None):  # prompt_parser.get_learned_conditioning
        return model.get_learned_conditioning(list(prompts))

    def reset_objects(self):
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()

    def process_images(self, enabled=True):
        w = self.world
        w.integration.begin(self, enabled)
        self.all_prompts, self.all_hr_prompts = [self.prompt], [self.hr_prompt]
        self.init(self.all_prompts, [1], [1])
        self.iteration = 0
        self.prompts = list(self.all_prompts)
        w.integration.before_batch(self, self.prompts)
        self.prompts, self.extra_network_data = parse_prompts(self.prompts)
        w.activate(self, self.extra_network_data)
        self.reset_objects()
        self.get_conds_with_caching(self.te_function, self.prompts, self.steps, [[None, None]], self.extra_network_data)
        self.reset_objects()
        self.sampler = ForgeSampler(self.sampler_kind, w.unet_log, w)
        if self.fail:
            self.sampler.fail_at, self.sampler.fail_exc = self.fail
        w.integration.before_sampling(self)
        try:
            self.sampler.sample(self, x=None)
            if self.enable_hr:
                _, self.hr_extra_network_data = parse_prompts(self.all_hr_prompts)
                self.sampler = ForgeSampler(self.sampler_kind, w.unet_log, w)
                w.activate(self, self.hr_extra_network_data)
                self.is_hr_pass = True
                if w.layout is forge.Layout.FORGE_MAIN:
                    w.integration.before_sampling(self)  # processing.py l.1510, before the reset
                self.reset_objects()
                w.integration.before_sampling(self)
                self.sampler.sample_img2img(self, None, self.hr_steps, 0.5)
                self.is_hr_pass = False
        finally:
            state = w.integration.finish(self)  # postprocess (the host's finally: the script's too)
        return state


@pytest.fixture(params=list(LAYOUTS))
def layout(request):
    return request.param


def multipliers(state, name="other"):
    return [e.multipliers[name] for e in state.trace]


def run(world, prompt, **kw):
    start = len(world.unet_log)
    te_start = len(world.te_log)
    state = ForgeP(world, prompt, **kw).process_images()
    return state, [w for _, w in world.unet_log[start:]], world.te_log[te_start:]


# -- layouts ---------------------------------------------------------------------------------------


def test_each_layout_is_detected_from_its_features(tmp_path, layout):
    world = World(tmp_path, layout)
    assert forge.detect_layout(world.sd_model.forge_objects.unet) is world.layout


def test_an_unknown_patcher_is_refused_before_anything_is_written(tmp_path):
    world = World(tmp_path, "forge-main")
    world.sd_model.forge_objects_original.unet = types.SimpleNamespace(model=world.kmodel, patches=[])
    world.sd_model.forge_objects.unet = world.sd_model.forge_objects_original.unet
    world.sd_model.forge_objects_after_applying_lora.unet = world.sd_model.forge_objects_original.unet
    with pytest.raises(HostLayoutError, match="does not recognise this Forge build"):
        ForgeP(world, "a cat <lora:other:0@0.5:1>").process_images()
    for key, value in world.state().items():
        assert torch.equal(value, world.original_state[key]), key


def test_a_model_family_the_mapping_does_not_cover_is_refused(tmp_path):
    world = World(tmp_path, "neo-2026-09", family="flux")
    with pytest.raises(UnsupportedModelError, match="cover SD 1.x, SD 2.x and SDXL"):
        ForgeP(world, "a cat <lora:other:0@0.5:1>").process_images()
    ForgeP(world, "a cat <lora:other:0.5>").process_images()  # plain tags: the host's business


# -- baked: the engine over the weights Forge wrote ----------------------------------------------


def test_baked_step_schedule_adds_to_the_host_bake_and_restores(tmp_path, layout):
    world = World(tmp_path, layout)
    _, plain, plain_te = run(world, "a cat <lora:wday:0.8>")
    after_plain = {k: v.clone() for k, v in world.state().items()}
    backups = world.backups()
    bake = plain[0]
    assert not torch.equal(bake, world.original_state["unet." + UNET_KEY])  # the host baked its LoRA
    state, evals, te = run(world, "a cat <lora:wday:0.8> <lora:other:0@0.5:1>")
    assert multipliers(state) == [0.0] * 4 + [1.0] * 4
    assert all(torch.equal(w, bake) for w in evals[:4])  # the host's bake, untouched
    delta = _delta(world, "other", UNET_KEY)
    for w in evals[4:]:
        torch.testing.assert_close(w, bake + delta, atol=1e-5, rtol=0)
    assert torch.equal(te[0], plain_te[0])  # te = the same schedule at step 0: 0
    for key, value in world.state().items():
        assert torch.equal(value, after_plain[key]), key  # the model as the host left it
    assert all(torch.equal(v, world.backups()[k]) for k, v in backups.items())  # backups never saw ours
    _, again, _ = run(world, "a cat <lora:wday:0.8>")
    assert all(torch.equal(w, bake) for w in again)
    _, none, _ = run(world, "a cat")
    for key, value in world.state().items():
        assert torch.equal(value, world.original_state[key]), key


def _delta(world, name, key):
    """ΔW of a network on a Forge key at strength 1, with the core's own loader."""
    network = load_network(str(world.paths[name]), name=name)
    shapes = {k: tuple(v.shape) for k, v in world.host.model().named_parameters()}
    view_key = "model." + key if key.startswith("diffusion_model.") else None
    (target,) = [t for t in map_network(network.modules, shapes).targets if t.weight == view_key]
    return target.module.weight_delta(world.original_state["unet." + key])


def test_constant_schedule_goes_to_the_host_as_plain_numbers(tmp_path, layout):
    world = World(tmp_path, layout)
    state, _, _ = run(world, "a cat <lora:wday:0.8@0,0.8@1>")
    assert world.builtin_calls[-1] == [("wday", 0.8, 0.8)] and state.trace == []


def test_te_schedule_in_baked_mode(tmp_path, layout):
    world = World(tmp_path, layout)
    _, _, host_te = run(world, "a cat <lora:other:0.5:0>")
    _, _, none_te = run(world, "a cat")
    state, evals, ours_te = run(world, "a cat <lora:other:te=0.5:unet=0:hr=0>")
    torch.testing.assert_close(ours_te[0], host_te[0], atol=1e-5, rtol=0)
    assert not torch.equal(ours_te[0], none_te[0])
    assert all(torch.equal(w, world.original_state["unet." + UNET_KEY]) for w in evals)
    for key, value in world.state().items():
        assert torch.equal(value, world.original_state[key]), key


def test_te_schedule_next_to_a_new_host_lora_leaves_the_host_bake_clean(tmp_path, layout):
    """The host writes its text-encoder patches when the encoder is loaded for conditioning; ours
    go on after that load, so its backup and its bake never contain our values."""
    world = World(tmp_path, layout)
    _, _, reference = run(world, "a cat <lora:wday:0.5>")
    run(world, "a cat")
    _, _, mixed = run(world, "a cat <lora:wday:0.5> <lora:other:te=0.5:unet=0:hr=0>")
    assert not torch.equal(mixed[0], reference[0])
    _, _, after = run(world, "a cat <lora:wday:0.5>")
    assert torch.equal(after[0], reference[0])
    run(world, "a cat")
    for key, value in world.state().items():
        assert torch.equal(value, world.original_state[key]), key


@pytest.mark.parametrize("stop", ["interrupt", "exception"])
def test_baked_restores_after_interrupt_and_exception(tmp_path, layout, stop):
    world = World(tmp_path, layout)
    run(world, "a cat <lora:wday:0.5>")
    after_plain = {k: v.clone() for k, v in world.state().items()}
    exc = InterruptedException() if stop == "interrupt" else RuntimeError("boom")
    if stop == "interrupt":
        run(world, "a cat <lora:wday:0.5> <lora:other:0@0,1@1>", fail=(3, exc))
    else:
        with pytest.raises(RuntimeError, match="boom"):
            run(world, "a cat <lora:wday:0.5> <lora:other:0@0,1@1>", fail=(3, exc))
    for key, value in world.state().items():
        assert torch.equal(value, after_plain[key]), key


def test_hires_pass_follows_the_hires_schedule(tmp_path, layout):
    world = World(tmp_path, layout)
    state, evals, _ = run(world, "a cat <lora:other:0@0.5:1:hr=0.25>", hr=True)
    first = [e.multipliers["other"] for e in state.trace if not e.hires]
    hires = [e.multipliers["other"] for e in state.trace if e.hires]
    assert first == [0.0] * 4 + [1.0] * 4 and hires and set(hires) == {0.25}
    for key, value in world.state().items():
        assert torch.equal(value, world.original_state[key]), key


# -- on the fly: the host's own per-forward patches -----------------------------------------------


def test_on_the_fly_constant_equals_the_hosts_own_on_the_fly_tag_bit_for_bit(tmp_path, layout):
    world = World(tmp_path, layout, online=True)
    world.kmodel.storage_dtype = torch.float8_e4m3fn  # Forge main: on the fly only off fp32/16/bf16
    _, host, host_te = run(world, "a cat <lora:other:0.4>")
    _, ours, ours_te = run(world, "a cat <lora:other:0.4:hr=0.3>")
    assert all(torch.equal(a, b) for a, b in zip(host, ours, strict=True))
    assert torch.equal(host_te[0], ours_te[0])
    for key, value in world.state().items():
        assert torch.equal(value, world.original_state[key]), key  # nothing written into the model


def test_on_the_fly_step_schedule_next_to_a_host_lora(tmp_path, layout):
    world = World(tmp_path, layout, online=True)
    world.kmodel.storage_dtype = torch.float8_e4m3fn
    _, host_only, _ = run(world, "a cat <lora:wday:0.5>")
    state, evals, _ = run(world, "a cat <lora:wday:0.5> <lora:other:0@0.5:1>")
    assert multipliers(state) == [0.0] * 4 + [1.0] * 4
    assert all(torch.equal(w, host_only[0]) for w in evals[:4])
    expected = world.host_module.merge_lora_to_weight(
        [[1.0, _host_patch(world, "other", UNET_KEY), 1.0, None, None]], host_only[0].clone(), UNET_KEY, computation_dtype=torch.float32
    )
    for w in evals[4:]:
        assert torch.equal(w, expected)
    _, again, _ = run(world, "a cat <lora:wday:0.5>")
    assert all(torch.equal(w, host_only[0]) for w in again)
    assert _ours_left(world) == []


def _host_patch(world, name, key):
    from safetensors.torch import load_file

    patches, _ = world.host_module.load_lora(load_file(str(world.paths[name])), world.host_module.unet_key_map(world.kmodel, {}))
    return patches[key]


def _ours_left(world):
    """Layers still carrying an on-the-fly entry of ours after the generation: a Neo function of
    ours, or (Forge main) a ``forge_online_loras`` table the host's loader did not put there."""
    host_layers = set()
    if world.layout is forge.Layout.FORGE_MAIN:
        for root in (world.kmodel, world.encoders):
            host_layers.update(id(m) for m in root.lora_loader.online_backup)
    left = []
    for root in (world.kmodel, world.encoders):
        for name, module in root.named_modules():
            functions = list(vars(module).get("weight_function", ())) + list(vars(module).get("bias_function", ()))
            if any(isinstance(f, forge._NeoPatch) for f in functions):
                left.append(name)
            if "forge_online_loras" in vars(module) and id(module) not in host_layers:
                left.append(name)
    return left


def test_on_the_fly_restores_after_an_exception(tmp_path, layout):
    world = World(tmp_path, layout, online=True)
    world.kmodel.storage_dtype = torch.float8_e4m3fn
    with pytest.raises(RuntimeError):
        run(world, "a cat <lora:other:0@0,1@1>", fail=(3, RuntimeError("boom")))
    assert _ours_left(world) == []
    assert not any("forge_online_loras" in vars(m) for m in world.kmodel.modules())
    _, none, _ = run(world, "a cat")
    assert all(torch.equal(w, world.original_state["unet." + UNET_KEY]) for w in none)


def test_forge_main_bakes_fp32_storage_even_with_the_on_the_fly_option(tmp_path):
    world = World(tmp_path, "forge-main", online=True)  # storage fp32: the host bakes, so do we
    assert not world.integration.online("unet")
    world.kmodel.storage_dtype = torch.float8_e4m3fn
    assert world.integration.online("unet")
    for neo in ("neo-2026-08", "neo-2026-09"):  # Neo keeps the setting for every storage
        (tmp_path / neo).mkdir()
        assert World(tmp_path / neo, neo, online=True).integration.online("unet")


def test_unwritable_weights_go_on_the_fly(tmp_path):
    world = World(tmp_path, "forge-main")
    layer = world.kmodel.get_submodule(UNET_KEY.rpartition(".")[0])
    layer.scale_weight = torch.ones(1)  # an fp8 checkpoint's weight scale: W is stored divided by it
    assert world.integration.online("unet") and not world.integration.online("te")


# -- tags -------------------------------------------------------------------------------------------


def test_bad_tag_and_missing_network_stop_before_sampling(tmp_path, layout):
    world = World(tmp_path, layout)
    with pytest.raises(ScheduleSyntaxError, match="'abc' at column"):
        ForgeP(world, "a cat <lora:other:0@0.3:abc>").process_images()
    with pytest.raises(MissingNetworkError, match="nope"):
        ForgeP(world, "a cat <lora:nope:0@0.3:1>").process_images()
    assert world.unet_log == []


def test_neo_builtin_scheduler_syntax_is_left_to_the_host(tmp_path, caplog):
    world = World(tmp_path, "neo-2026-09", builtin_scheduler=True)
    handler = world.extra_networks.extra_network_registry["lora"]
    seen = []
    handler.activate = lambda p, params: seen.extend(x.items for x in params)
    with caplog.at_level("INFO", logger="scheduled_lora"):
        state, _, _ = run(world, "a cat <lora:wday:[0@0,1@1]> <lora:other:0@0.5:1>")
    assert seen == [["wday", "[0@0,1@1]"]]
    assert multipliers(state) == [0.0] * 4 + [1.0] * 4
    assert "Forge Neo's own schedule syntax" in caplog.text


# -- the model view --------------------------------------------------------------------------------


def test_sdxl_view_reaches_both_text_encoders(tmp_path):
    kmodel, encoders = forge_modules(tiny_sd("sdxl"))
    objects = SimpleNamespace(unet=SimpleNamespace(model=kmodel), clip=SimpleNamespace(cond_stage_model=encoders))
    view = forge.model_view(objects, "sdxl")
    shapes = {k: tuple(v.shape) for k, v in view.named_parameters()}
    layers = [
        Layer("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", shapes["conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]),
        Layer("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", shapes["conditioner.embedders.1.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]),
        Layer("lora_unet_input_blocks_4_1_proj_in", shapes["model.diffusion_model.input_blocks.4.1.proj_in.weight"]),
    ]
    path = tmp_path / "xl.safetensors"
    save_file(random_network(layers, "lora", rank=2, seed=0), str(path))
    mapping = map_network(load_network(str(path), name="xl").modules, shapes)
    assert mapping.unmatched == [] and {t.component for t in mapping.targets} == {"te", "te2", "unet"}
    # The view holds Forge's own parameter objects.
    assert view.get_parameter("conditioner.embedders.1.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight") is (
        encoders.clip_g.transformer.get_parameter("text_model.encoder.layers.0.self_attn.q_proj.weight")
    )


def test_dyn_cut_keeps_the_scale_of_the_files_rank():
    up, down = torch.randn(6, 4), torch.randn(4, 5)
    state = {"x.lora_up.weight": up, "x.lora_down.weight": down, "x.alpha": torch.tensor(2.0)}
    cut = forge.rank_cut(state, 2)
    assert cut["x.lora_down.weight"].shape == (2, 5) and cut["x.lora_up.weight"].shape == (6, 2)
    # Forge divides alpha by the rank it sees: (alpha·2/4) / 2 == alpha / 4, the file's scale.
    assert float(cut["x.alpha"]) / 2 == pytest.approx(2.0 / 4)
