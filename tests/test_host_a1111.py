"""The A1111 adapter against the host's call order and objects, without a WebUI.

``FakeP.process_images`` replays ``modules/processing.py: process_images_inner`` of v1.10.1 in the
parts that matter here: scripts.process -> p.init -> per batch (before_process_batch,
parse_extra_network_prompts, extra_networks.activate, setup_conds via get_conds_with_caching,
process_before_every_sampling, sampler.sample -> launch_sampling -> func(model_wrap_cfg, x,
sigmas=...) -> CFGDenoiser.forward -> on_cfg_denoiser) -> hires pass (re-activation,
calculate_hr_conds, a fresh sampler) -> postprocess. The builtin Lora handler is a stand-in that
does ``float()`` on its positional arguments like the real one.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from support.sd_layouts import ModuleTree, kohya_lora_state, ldm_state_dict, tiny_sd
from torch import nn

from lib_scheduled_lora.core.session import Runtime
from lib_scheduled_lora.errors import MissingNetworkError, NotSafetensorsError, ScheduleSyntaxError
from lib_scheduled_lora.hosts import a1111

UNET_W = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
TE_W = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


class InterruptedException(BaseException):
    pass


# -- host stand-ins -------------------------------------------------------------------------------


class ExtraNetworkParams:  # modules/extra_networks.py
    def __init__(self, items=None):
        self.items = items
        self.positional, self.named = [], {}
        for item in items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


def parse_prompts(prompts):
    """extra_networks.parse_prompts: strip tags; the FIRST prompt's networks for the batch."""
    res, data = [], None
    for prompt in prompts:
        found = {}

        def sub(m, found=found):
            found.setdefault(m.group(1), []).append(ExtraNetworkParams(m.group(2).split(":")))
            return ""

        res.append(re.sub(r"<(\w+):([^>]+)>", sub, prompt))
        if data is None:
            data = found
    return res, data or {}


class ExtraNetworkLora:  # the builtin: float() on positional multipliers
    name = "lora"

    def __init__(self):
        self.calls = []

    def activate(self, p, params_list):
        self.calls.append(
            [
                (
                    params.positional[0],
                    float(params.positional[1]) if len(params.positional) > 1 else 1.0,
                    dict(params.named),
                )
                for params in params_list
            ]
        )

    def deactivate(self, p):
        pass


class FakeSampler:
    def __init__(self, kind, log):
        self.kind = kind
        self.log = log
        self.funcname = {"euler": "sample_euler", "heun": "sample_heun", "ddim": "ddim"}[kind]
        self.model_wrap_cfg = SimpleNamespace(steps=None, step=0)
        self.func = getattr(self, "_" + kind)
        self.fail_at = None

    def _evaluate(self, model, noise):
        self.model_wrap_cfg.step += 1
        if self.fail_at is not None and self.model_wrap_cfg.step > self.fail_at:
            raise self.fail_exc
        params = SimpleNamespace(sigma=torch.tensor([noise, noise]), denoiser=SimpleNamespace(sampler=self))
        model.on_cfg_denoiser(params)
        for callback in model.other_denoiser_callbacks:  # other extensions' on_cfg_denoiser
            callback(params)
        model.unet_forward()
        self.log.append((noise, model.weight(UNET_W).clone()))

    def _euler(self, model, x, sigmas=None, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):
            self._evaluate(model, float(sigmas[i]))
        return x

    def _heun(self, model, x, sigmas=None, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):
            self._evaluate(model, float(sigmas[i]))
            if sigmas[i + 1] > 0:
                self._evaluate(model, float(sigmas[i + 1]))
        return x

    def _ddim(self, model, x, timesteps=None, extra_args=None, callback=None, disable=None):
        for i in range(len(timesteps) - 1):
            self._evaluate(model, float(timesteps[len(timesteps) - 1 - i]))
        return x

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        try:
            return func()
        except InterruptedException:
            return None

    def sample(self, p, x, steps=None):
        steps = steps or p.steps
        if self.kind == "ddim":
            ts = torch.tensor([min(999, t + 1) for t in range(0, 1000, 1000 // steps)])
            return self.launch_sampling(steps, lambda: self.func(p.model_wrap, x, timesteps=ts))
        sigmas = torch.linspace(10, 0.1, steps).tolist() + [0.0]
        return self.launch_sampling(steps, lambda: self.func(p.model_wrap, x, sigmas=torch.tensor(sigmas)))

    def sample_img2img(self, p, x, steps, denoise):
        t_enc = int(denoise * steps)
        sigmas = torch.linspace(10, 0.1, steps).tolist() + [0.0]
        sched = torch.tensor(sigmas[steps - t_enc - 1 :])
        return self.launch_sampling(t_enc + 1, lambda: self.func(p.model_wrap, x, sigmas=sched))


class FakeP:
    """The parts of StableDiffusionProcessingTxt2Img that the adapter touches, in the host's order."""

    cached_c = [None, None]

    def __init__(
        self,
        world,
        prompt,
        steps=10,
        batch_size=1,
        n_iter=1,
        sampler="euler",
        hr=False,
        hr_prompt=None,
        hr_steps=6,
        denoise=0.5,
    ):
        self.world = world
        self.prompt, self.steps, self.batch_size, self.n_iter = prompt, steps, batch_size, n_iter
        self.sampler_kind, self.enable_hr, self.hr_prompt = sampler, hr, hr_prompt or prompt
        self.hr_steps, self.denoise = hr_steps, denoise
        self.extra_generation_params = {}
        self.comments = []
        self.is_hr_pass = False
        self.model_wrap = SimpleNamespace(
            on_cfg_denoiser=world.integration.on_cfg_denoiser,
            other_denoiser_callbacks=world.other_denoiser_callbacks,
            unet_forward=world.unet_forward,
            weight=world.weight,
        )
        self.te_seen = []

    def comment(self, text):
        self.comments.append(text)

    # host methods the adapter wraps per instance
    def init(self, all_prompts, all_seeds, all_subseeds):
        self.initialised = True

    def cached_params(
        self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False
    ):
        return (
            tuple(required_prompts),
            steps,
            hires_steps,
            repr([(k, [x.items for x in v]) for k, v in extra_network_data.items()]),
        )

    def get_conds_with_caching(
        self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None
    ):
        key = self.cached_params(required_prompts, steps, extra_network_data, hires_steps, False)
        for cache in caches:
            if cache[0] is not None and cache[0] == key:
                return cache[1]
        caches[0][1] = function(self.world.shared.sd_model, required_prompts, steps, hires_steps, False)
        caches[0][0] = key
        return caches[0][1]

    def _te_function(self, model, prompts, steps, hires_steps, old):
        self.te_seen.append((hires_steps is not None, self.world.weight(TE_W).clone()))
        return object()

    def process_images(self, script_enabled=True, fail=None):
        w = self.world
        w.integration.begin(self, script_enabled)
        self.all_prompts = [self.prompt] * (self.batch_size * self.n_iter)
        self.all_hr_prompts = [self.hr_prompt] * len(self.all_prompts)
        self.init(self.all_prompts, [1], [1])
        for n in range(self.n_iter):
            self.iteration = n
            self.prompts = self.all_prompts[n * self.batch_size : (n + 1) * self.batch_size]
            w.integration.before_batch(self, self.prompts)
            self.prompts, self.extra_network_data = parse_prompts(self.prompts)
            if self.enable_hr:
                _, self.hr_extra_network_data = parse_prompts(self.all_hr_prompts[:1])
            w.activate(self, self.extra_network_data)
            self.get_conds_with_caching(
                self._te_function, self.prompts, self.steps, [[None, None]], self.extra_network_data
            )
            if self.enable_hr:
                self.get_conds_with_caching(
                    self._te_function,
                    self.prompts,
                    self.steps,
                    [[None, None]],
                    self.hr_extra_network_data,
                    self.hr_steps,
                )
            self.sampler = FakeSampler(self.sampler_kind, w.unet_log)
            if fail:
                self.sampler.fail_at, self.sampler.fail_exc = fail
            w.integration.before_sampling(self)
            self.sampler.sample(self, x=None)
            if self.enable_hr:
                self.is_hr_pass = True
                w.activate(self, self.hr_extra_network_data)
                self.sampler = FakeSampler(self.sampler_kind, w.unet_log)
                w.integration.before_sampling(self)
                self.sampler.sample_img2img(self, None, self.hr_steps, self.denoise)
                self.is_hr_pass = False
        return w.integration.finish(self)


_CACHE = {}


def _fixtures():
    """The tiny SD1 model (ldm names) and a LoRA on a few of its layers, built once."""
    if not _CACHE:
        model = tiny_sd("sd1")
        _CACHE["ldm"] = ldm_state_dict(model)
        _CACHE["lora"] = kohya_lora_state(model, seed=1)
    return _CACHE["ldm"], _CACHE["lora"]


class World:
    def __init__(self, tmp_path, mode="merge"):
        ldm, state = _fixtures()
        self.model = ModuleTree(ldm)
        self.before = {k: v.clone() for k, v in self.model.state_dict().items()}
        path = tmp_path / "wday.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        (tmp_path / "old.pt").write_bytes(b"not read")
        entries = {
            "wday": SimpleNamespace(filename=str(path)),
            "old": SimpleNamespace(filename=str(tmp_path / "old.pt")),
        }
        self.networks = SimpleNamespace(
            available_network_aliases=entries, list_available_networks=lambda: None, loaded_networks=[]
        )
        opts = SimpleNamespace(lora_functional=False, scheduled_lora_mode=mode, scheduled_lora_cache_mb=64)
        self.shared = SimpleNamespace(sd_model=self.model, opts=opts)
        self.builtin = ExtraNetworkLora()
        self.extra_networks = SimpleNamespace(
            extra_network_registry={"lora": self.builtin}, extra_network_aliases={"lyco": self.builtin}
        )
        self.host = a1111.A1111Host(self.shared, networks=lambda: self.networks)
        host_settle = self.host.settle
        self.host.settle = lambda model: (host_settle(model), self.builtin_apply())
        self.runtime = Runtime(self.host)
        self.integration = a1111.A1111Integration(self.runtime, self.extra_networks)
        self.unet_log = []
        self.other_denoiser_callbacks = []
        # The builtin's plain networks, per parameter: (its CPU backup, ΔW at multiplier 1).
        self.builtin_layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.builtin_current: dict[str, tuple] = {}

    def builtin_apply(self):
        """networks.network_apply_weights, per layer: when the wanted networks changed, restore the
        weight from the backup and add the networks, writing into whatever ``.data`` is now."""
        wanted = self.host.state()
        for name, (backup, delta) in self.builtin_layers.items():
            if self.builtin_current.get(name) != wanted:
                strength = sum(n.unet_multiplier for n in self.networks.loaded_networks)
                self.model.get_parameter(name).data.copy_(backup + strength * delta)
                self.builtin_current[name] = wanted

    def unet_forward(self):
        """The diffusion model's forward: its pre-hooks, then every layer's lazy builtin apply."""
        unet = self.model.model.diffusion_model
        for hook in list(unet._forward_pre_hooks.values()):
            # torch would replace the UNet's inputs with a non-None result
            assert hook(unet, (torch.zeros(1), torch.ones(1))) is None
        self.builtin_apply()

    def weight(self, name):
        return self.model.get_parameter(name).data

    def activate(self, p, data):
        """extra_networks.activate: one call per handler (lora and its lyco alias merged)."""
        registry, aliases = (
            self.extra_networks.extra_network_registry,
            self.extra_networks.extra_network_aliases,
        )
        by_handler = {}
        for name, params in data.items():
            handler = registry.get(name) or aliases.get(name)
            if handler is not None:
                by_handler.setdefault(id(handler), (handler, []))[1].extend(params)
        for handler, params in by_handler.values():
            handler.activate(p, params)
        if not by_handler:
            registry["lora"].activate(p, [])

    def assert_restored(self):
        for key, value in self.model.state_dict().items():
            assert torch.equal(value, self.before[key]), key


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


@pytest.fixture(params=["host memory", "accelerator"])
def placement(request, monkeypatch):
    """Run a test with weights placed as on the CPU (swapped buffers) and as on a GPU (written in
    place, originals in host RAM): the builtin's lazy re-application must meet both."""
    if request.param == "accelerator":
        from lib_scheduled_lora.core import engine as engine_module
        from lib_scheduled_lora.core import live as live_module

        monkeypatch.setattr(live_module, "HOST_MEMORY", frozenset())
        monkeypatch.setattr(engine_module, "is_host_memory", live_module.is_host_memory)
    return request.param


def _multipliers(world):
    return [e.multipliers["wday"] for e in world.runtime_trace]


def test_step_schedule_follows_the_denoiser_and_restores(placement, world):
    p = FakeP(world, "a cat <lora:wday:0@0.3:1>", steps=20)
    state = p.process_images()
    ms = [e.multipliers["wday"] for e in state.trace]
    assert ms == [0.0] * 6 + [1.0] * 14  # 6/19 >= 0.3
    base = world.before[UNET_W]
    assert all(torch.equal(w, base) for _, w in world.unet_log[:6])
    assert all(not torch.equal(w, base) for _, w in world.unet_log[6:])
    world.assert_restored()
    # te = the same schedule, at step 0: 0 -> the text encoder saw base weights
    assert [torch.equal(w, world.before[TE_W]) for _, w in p.te_seen] == [True]
    assert world.builtin.calls == [[]]  # the builtin never saw the schedule


def test_plain_tags_go_to_the_builtin_unchanged_with_pass_through_args(world):
    p = FakeP(world, "<lora:wday:0.8> <lyco:wday:0.5:1:lbw=OUTD> <lora:wday:0@0.5:1:other=3>")
    p.process_images()
    assert world.builtin.calls == [[("wday", 0.8, {}), ("wday", 0.5, {"lbw": "OUTD"})]]
    world.assert_restored()


def test_constant_schedule_is_handed_to_the_builtin_as_plain_numbers(world):
    p = FakeP(world, "<lora:wday:0.8@0,0.8@1> <lora:wday:0.5:hr=0.5:lbw=X>")
    state = p.process_images()
    assert world.builtin.calls == [[("wday", 0.8, {}), ("wday", 0.5, {"hr": "0.5", "lbw": "X"})]]
    assert state.trace == []
    # rewritten in place: other extensions reading the prompt's network data see the same numbers
    first = p.extra_network_data["lora"][0]
    assert (first.items, first.positional, first.named) == (["wday", "0.8", "0.8"], ["wday", "0.8", "0.8"], {})


def test_te_schedule_is_applied_at_conditioning_only(placement, world):
    p = FakeP(world, "<lora:wday:te=1:unet=0@0.5:1>", steps=4)
    state = p.process_images()
    ((hires, te_weight),) = p.te_seen
    assert not torch.equal(te_weight, world.before[TE_W])
    assert [e.multipliers["wday"] for e in state.trace] == [0.0] * 2 + [1.0] * 2
    world.assert_restored()


def test_host_network_changed_mid_pass_by_another_extension(placement, world):
    """LoRA Block Weight's ``start=`` changes a builtin network's multiplier in its own
    on_cfg_denoiser; the builtin then rewrites the layer from its backup. Our merged values must
    survive that, and the layer must end with the builtin's new state, not a stale copy."""
    host_delta = torch.full_like(world.before[UNET_W], 0.01)
    world.builtin_layers[UNET_W] = (world.before[UNET_W].clone(), host_delta)
    plain = SimpleNamespace(name="plain", te_multiplier=1.0, unet_multiplier=1.0, dyn_dim=None)
    world.networks.loaded_networks = [plain]
    seen = []

    def lbw_start(params):  # at the 5th evaluation, the plain network drops to 0.5
        seen.append(params)
        if len(seen) == 5:
            plain.unet_multiplier = 0.5

    world.other_denoiser_callbacks.append(lbw_start)
    p = FakeP(world, "<lora:wday:0@0,1@1>", steps=8)
    state = p.process_images()
    with_host = [w for _, w in world.unet_log]
    # The same schedule with no builtin network: our part alone.
    world.builtin_layers.clear()
    world.networks.loaded_networks = []
    world.other_denoiser_callbacks.clear()
    world.model.get_parameter(UNET_W).data.copy_(world.before[UNET_W])
    world.unet_log.clear()
    FakeP(world, "<lora:wday:0@0,1@1>", steps=8).process_images()
    ours_only = [w for _, w in world.unet_log]
    strengths = [1.0] * 4 + [0.5] * 4
    for i, (got, ours) in enumerate(zip(with_host, ours_only, strict=True)):
        torch.testing.assert_close(got, ours + strengths[i] * host_delta, atol=1e-6, rtol=0, msg=f"evaluation {i}")
    assert [e.multipliers["wday"] for e in state.trace] == [i / 7 for i in range(8)]
    world.assert_restored()  # (the second run ended without builtin networks)


def test_pass_ends_with_the_builtin_state_it_changed_to(placement, world):
    host_delta = torch.full_like(world.before[UNET_W], 0.01)
    world.builtin_layers[UNET_W] = (world.before[UNET_W].clone(), host_delta)
    plain = SimpleNamespace(name="plain", te_multiplier=1.0, unet_multiplier=1.0, dyn_dim=None)
    world.networks.loaded_networks = [plain]
    world.other_denoiser_callbacks.append(lambda params: setattr(plain, "unet_multiplier", 0.5))
    FakeP(world, "<lora:wday:1@0.5:0.5>", steps=6).process_images()  # ours is merged all along
    assert torch.equal(world.weight(UNET_W), world.before[UNET_W] + 0.5 * host_delta)
    world.networks.loaded_networks = []  # the next generation has no networks: the builtin restores
    world.builtin_apply()
    world.assert_restored()


class FakePromptParser:
    """modules/prompt_parser.py in the parts the adapter uses: ``[a:b:0.5]`` over 10 steps is
    [[4, "a"], [9, "b"]] (a until step 4, b after); get_learned_conditioning encodes each distinct
    prompt's segments in one model call."""

    def __init__(self, schedules):
        self.schedules = schedules  # prompt -> [[end_at_step, text], ...]

    def get_learned_conditioning_prompt_schedules(self, prompts, steps, hires_steps=None, use_old=False):
        return [self.schedules[prompt] for prompt in prompts]

    def get_learned_conditioning(self, model, prompts, steps, hires_steps=None, use_old=False):
        schedules = self.get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old)
        out, cache = [], {}
        for prompt, schedule in zip(prompts, schedules, strict=True):
            if prompt not in cache:
                conds = model.get_learned_conditioning([text for _, text in schedule])
                cache[prompt] = [(end, conds[i]) for i, (end, _) in enumerate(schedule)]
            out.append(cache[prompt])
        return out


@pytest.mark.parametrize("args", ["te=0@0.5:1:unet=1", "1:0@0.5:1"])
def test_te_schedule_per_prompt_editing_segment(world, args):
    """Each segment is encoded at the te strengths of its first step; order is kept."""
    parser = FakePromptParser({"x [a:b:0.5]": [[4, "x a"], [9, "x b"]], "plain": [[9, "plain"]]})
    world.integration.prompt_parser = parser
    calls = []

    def encode(texts):  # the model's text encoder: records what the te weight was for which texts
        calls.append((list(texts), torch.equal(world.weight(TE_W), world.before[TE_W])))
        return torch.stack([torch.full((2,), float(len(t))) for t in texts])

    world.model.get_learned_conditioning = encode
    prompt = f"x [a:b:0.5] <lora:wday:{args}>"
    p = FakeP(world, prompt, steps=10)
    world.integration.begin(p, True)
    _, data = parse_prompts([prompt])
    world.activate(p, data)
    conds = p.get_conds_with_caching(parser.get_learned_conditioning, ["x [a:b:0.5]", "plain"], 10, [[None, None]], data)
    assert [[end for end, _ in c] for c in conds] == [[4, 9], [9]]
    assert [c[0][1].tolist() for c in conds] == [[3.0, 3.0], [5.0, 5.0]] and conds[0][1][1].tolist() == [3.0, 3.0]
    if args == "1:0@0.5:1":  # te constant (UNet scheduled): one call per prompt, as the host's
        assert calls == [(["x a", "x b"], False), (["plain"], False)]
    else:  # segment b starts at step 5 = 5/9 of the way: past 0.5, so the LoRA's te is on
        assert calls == [(["x a"], True), (["x b"], False), (["plain"], True)]
    assert "get_learned_conditioning" not in vars(world.model) or world.model.get_learned_conditioning is encode
    assert "get_learned_conditioning_prompt_schedules" not in vars(parser)
    world.assert_restored()


def test_error_inside_a_segmented_encode_restores_everything(world):
    parser = FakePromptParser({"x [a:b:0.5]": [[4, "x a"], [9, "x b"]]})
    world.integration.prompt_parser = parser

    def encode(texts):
        if texts == ["x b"]:  # the second segment, encoded with the LoRA's te part merged
            assert not torch.equal(world.weight(TE_W), world.before[TE_W])
            raise RuntimeError("out of memory")
        return torch.zeros(len(texts), 2)

    world.model.get_learned_conditioning = encode
    prompt = "x [a:b:0.5] <lora:wday:te=0@0.5:1:unet=1>"
    p = FakeP(world, prompt, steps=10)
    world.integration.begin(p, True)
    _, data = parse_prompts([prompt])
    world.activate(p, data)
    with pytest.raises(RuntimeError, match="out of memory"):
        p.get_conds_with_caching(parser.get_learned_conditioning, ["x [a:b:0.5]"], 10, [[None, None]], data)
    assert world.model.get_learned_conditioning is encode
    assert "get_learned_conditioning_prompt_schedules" not in vars(parser)
    world.assert_restored()


def test_dyn_cuts_the_rank_of_a_scheduled_network(world):
    """``dyn=1`` on a rank-2 LoRA: the UNet gets up[:, :1]·down[:1]·alpha/2, as the builtin would."""
    p = FakeP(world, "<lora:wday:0@0.5:1:dyn=1>", steps=4)
    p.process_images()
    _, state = _fixtures()
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # diffusers-style kohya name
    up, down = state[key + ".lora_up.weight"], state[key + ".lora_down.weight"]
    expected = world.before[UNET_W] + (up[:, :1] @ down[:1]) * float(state[key + ".alpha"]) / 2
    torch.testing.assert_close(world.unet_log[-1][1], expected, atol=1e-6, rtol=0)
    full = world.before[UNET_W] + (up @ down) * float(state[key + ".alpha"]) / 2
    assert not torch.allclose(world.unet_log[-1][1], full, atol=1e-4)
    assert world.builtin.calls == [[]]
    world.assert_restored()


@pytest.mark.parametrize("sampler,steps,evaluations", [("euler", 10, 10), ("heun", 10, 19), ("ddim", 20, 19)])
def test_sampler_families(world, sampler, steps, evaluations):
    p = FakeP(world, "<lora:wday:0@0,1@1>", steps=steps, sampler=sampler)
    state = p.process_images()
    positions = [e.position for e in state.trace]
    assert len(positions) == evaluations
    assert positions == sorted(positions) and positions[0] == 0
    assert positions[-1] == state.passes[0].grid.steps - 1
    assert state.trace[-1].multipliers["wday"] == 1.0
    world.assert_restored()


def test_hires_pass_uses_its_own_steps_and_hr_schedule(placement, world):
    p = FakeP(world, "<lora:wday:0@0.5:1:hr=0.25>", steps=10, hr=True, hr_steps=10, denoise=0.5)
    state = p.process_images()
    first = [e for e in state.trace if not e.hires]
    second = [e for e in state.trace if e.hires]
    assert [e.multipliers["wday"] for e in first] == [0.0] * 5 + [1.0] * 5
    assert state.passes[1].grid.steps == 6  # t_enc + 1
    assert {e.multipliers["wday"] for e in second} == {0.25}
    assert [h for h, _ in p.te_seen] == [False, True]
    world.assert_restored()


@pytest.mark.parametrize("exc", [RuntimeError("boom"), InterruptedException()])
def test_weights_restored_after_exception_or_interrupt_mid_sampling(placement, world, exc):
    p = FakeP(world, "<lora:wday:0@0.3:1>", steps=20)
    if isinstance(exc, RuntimeError):
        with pytest.raises(RuntimeError):
            p.process_images(fail=(10, exc))
    else:
        p.process_images(fail=(10, exc))
    world.assert_restored()
    assert world.runtime.current is None
    p2 = FakeP(world, "<lora:wday:0@0.3:1>", steps=20)  # and the next generation works
    p2.process_images()
    world.assert_restored()


def test_malformed_tag_stops_before_sampling_with_column(world):
    p = FakeP(world, "a <lora:wday:0@0.3:abc>")
    with pytest.raises(ScheduleSyntaxError) as info:
        p.process_images()
    assert "<lora:wday:0@0.3:abc>" in str(info.value) and "'abc' at column" in str(info.value)
    assert world.unet_log == []


def test_missing_network_and_pickle_files_are_refused(world):
    with pytest.raises(MissingNetworkError, match="nope"):
        FakeP(world, "<lora:nope:0.5>").process_images()
    with pytest.raises(NotSafetensorsError, match="old.pt"):
        FakeP(world, "<lora:old:0@0.5:1>").process_images()
    FakeP(world, "<lora:old:0.5>").process_images()  # plain: the host reads .pt itself


def test_disabled_drops_scheduled_tags_and_says_so_in_infotext(world):
    p = FakeP(world, "<lora:wday:0@0.3:1> <lora:wday:0.5>")
    state = p.process_images(script_enabled=False)
    assert state.trace == []
    assert world.builtin.calls == [[("wday", 0.5, {})]]
    assert p.extra_generation_params[a1111.INFOTEXT_ENABLED] == "off"
    assert state.ignored == ["<lora:wday:0@0.3:1>"]


def test_disabled_passes_everything_to_a_foreign_handler(world):
    class LoraCtlNetwork(ExtraNetworkLora):
        def activate(self, p, params_list):
            self.calls.append([params.items for params in params_list])

    foreign = LoraCtlNetwork()
    world.extra_networks.extra_network_registry["lora"] = foreign
    FakeP(world, "<lora:wday:0@0,1@1>").process_images(script_enabled=False)
    assert foreign.calls == [[["wday", "0@0", "1@1"]]] or foreign.calls == [[["wday", "0@0,1@1"]]]


def test_non_default_mode_goes_to_infotext(tmp_path):
    world = World(tmp_path, mode="bypass")
    p = FakeP(world, "<lora:wday:0@0.3:1>")
    p.process_images()
    assert p.extra_generation_params[a1111.INFOTEXT_MODE] == "bypass"
    world.assert_restored()
    q = FakeP(world, "<lora:wday:0.5>")
    q.process_images()
    assert a1111.INFOTEXT_MODE not in q.extra_generation_params


def test_batch_with_different_schedules_warns(world):
    p = FakeP(world, "<lora:wday:0@0.3:1>", batch_size=2)
    world.integration.begin(p, True)
    world.integration.before_batch(p, ["<lora:wday:0@0.3:1>", "<lora:wday:0@0.6:1>"])
    assert p.comments and "prompt 1" in p.comments[0]


def test_cond_cache_key_includes_the_switch(world):
    p = FakeP(world, "x")
    world.integration.begin(p, True)
    on = p.cached_params(["x"], 10, {})
    world.integration.begin(p, False)
    assert p.cached_params(["x"], 10, {}) != on


def test_xyz_copies_get_their_own_wrappers(world):
    p = FakeP(world, "<lora:wday:0@0.3:1>", steps=8)
    world.integration.begin(p, True)
    cell = copy.copy(p)
    cell.prompt = "<lora:wday:1@0.5:0>"
    state = cell.process_images()
    assert cell.get_conds_with_caching.args[0] is cell
    assert [e.multipliers["wday"] for e in state.trace] == [1.0] * 4 + [0.0] * 4
    world.assert_restored()


def test_wrapper_installation_is_idempotent_and_covers_aliases(world):
    en = world.extra_networks
    first = a1111.install_extra_network_wrapper(en)
    second = a1111.install_extra_network_wrapper(en)
    assert first is second is en.extra_network_registry["lora"] is en.extra_network_aliases["lyco"]
    assert first.inner is world.builtin


def test_settle_applies_the_builtin_before_we_copy(tmp_path):
    calls = []
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2)))
    for name, module in model.named_modules():
        module.network_layer_name = name.replace(".", "_")
    nets = SimpleNamespace(
        network_apply_weights=lambda m: calls.append(("apply", m.network_layer_name)),
        network_restore_weights_from_backup=lambda m: calls.append(("restore", m.network_layer_name)),
        network_reset_cached_weight=lambda m: calls.append(("reset", m.network_layer_name)),
    )
    shared = SimpleNamespace(sd_model=model, opts=SimpleNamespace(lora_functional=False))
    host = a1111.A1111Host(shared, networks=lambda: nets)
    host.settle(model)
    assert calls == [("apply", "0"), ("apply", "2_0")]  # patched layer types only, not containers
    calls.clear()
    shared.opts.lora_functional = True
    host.settle(model)
    assert calls == [("restore", "0"), ("reset", "0"), ("restore", "2_0"), ("reset", "2_0")]


def test_plot_is_drawn(world):
    p = FakeP(world, "<lora:wday:0@0,1@1:hr=0.5>", steps=6, hr=True, hr_steps=4)
    state = p.process_images()
    image = a1111.plot_passes(state)
    assert image.size[0] > 100 and image.size[1] > 200


def test_each_tag_is_parsed_once_per_generation(world, monkeypatch):
    """begin, validation, the batch warning, both passes' handler calls and conditioning all read
    the generation's TagIndex: every distinct tag text is parsed once."""
    from lib_scheduled_lora.core import tags as core_tags
    from lib_scheduled_lora.hosts import ownership

    parsed = []
    original = core_tags.parse_tag
    monkeypatch.setattr(ownership, "parse_tag", lambda text: parsed.append(text) or original(text))
    monkeypatch.setattr(core_tags, "parse_tag", lambda text: parsed.append(text) or original(text))
    prompt = "a cat <lora:wday:0@0.5:1:hr=0.25> <lora:wday:0.5>"
    FakeP(world, prompt, steps=10, hr=True, hr_steps=10, denoise=0.5, batch_size=2).process_images()
    assert sorted(parsed) == ["<lora:wday:0.5>", "<lora:wday:0@0.5:1:hr=0.25>"]


def test_webui_settings_read_every_option_and_fall_back_on_unusable_values():
    from lib_scheduled_lora.hosts.a1111 import webui_settings

    opts = SimpleNamespace(
        scheduled_lora_mode="bypass", scheduled_lora_cache_mb=512, scheduled_lora_device_budget_mb="1024"
    )
    settings = webui_settings(opts)
    assert (settings.mode, settings.cache_budget_mb, settings.device_budget_mb) == ("bypass", 512.0, 1024.0)
    # a config from an older version (no device budget) or edited by hand: defaults, never a failure
    broken = SimpleNamespace(scheduled_lora_mode="fast", scheduled_lora_cache_mb="lots", scheduled_lora_device_budget_mb=-5)
    settings = webui_settings(broken)
    assert (settings.mode, settings.cache_budget_mb, settings.device_budget_mb) == ("auto", 2048.0, 0.0)
    assert webui_settings(SimpleNamespace(scheduled_lora_cache_mb=float("nan"))).cache_budget_mb == 2048.0
