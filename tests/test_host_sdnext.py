"""The SD.Next adapter against the host's call order and a real diffusers pipeline, without SD.Next.

``SDNext.process_images`` replays SD.Next 058a7f0c (``modules/processing.py: process_images`` /
``process_images_inner``, ``processing_diffusers.py: process_diffusers / process_base /
process_hires``) in the parts that matter here: Script.process -> p.init -> per batch
(before_process_batch, parse_prompts - the *last* prompt with networks -, process_batch,
process_base: parse_prompts again, ``extra_networks.activate_filtered`` (the lora handler fuses
its plain networks in place, replacing the Parameter objects as SD.Next's fuse mode does),
prompt encoding outside the pipeline, the pipeline call with ``callback_on_step_end`` from
``p.task_args`` or SD.Next's own callback (which raises AssertionError on interrupt, caught by
process_base), hires on an img2img pipeline made from the same components) -> postprocess_batch
(skipped after an interrupt without keep_incomplete) -> postprocess -> on_after_process.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from support.random_networks import Layer, random_network, write
from support.tiny_models import clip_text_transformer, clip_tokenizer_dir, tiny_clip_config, tiny_pipeline
from torch import nn

from lib_scheduled_lora.core.engine import ScheduledNetwork
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.core.positions import scheduler_grid
from lib_scheduled_lora.core.schedule import parse_schedule
from lib_scheduled_lora.core.session import Runtime
from lib_scheduled_lora.errors import MissingNetworkError, ScheduleSyntaxError
from lib_scheduled_lora.hosts import sdnext
from lib_scheduled_lora.hosts.diffusers import attach
from lib_scheduled_lora.hosts.samplers import make_scheduler

pytestmark = pytest.mark.skipif(clip_tokenizer_dir() is None, reason="needs the CLIP tokenizer in shared/data")

STEPS = 6
HOST_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # the host's plain "hostnet"


# -- host stand-ins -------------------------------------------------------------------------------


class ExtraNetworkParams:  # modules/extra_networks.py
    def __init__(self, items=None):
        self.items = items or []
        self.positional, self.named = [], {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


def parse_prompts(prompts, extra_data=None):
    """extra_networks.parse_prompts: strip tags; the LAST prompt with any tag gives the networks."""
    res, data = [], extra_data or defaultdict(list)
    for prompt in prompts:
        found = defaultdict(list)

        def sub(m, found=found):
            found[m.group(1)].append(ExtraNetworkParams(m.group(2).split(":")))
            return ""

        res.append(re.sub(r"<(\w+):([^>]+)>", sub, prompt))
        if not data or found:
            data = found
    return res, data


class HostLora:
    """SD.Next's ExtraNetworkLora in native fuse mode, reduced to what the adapter meets: it reads
    its multipliers with float() (a ``@`` string goes to loractl's get_stepwise at step 0), and
    when its set changes subtracts the old ΔW from the live weight and adds the new one, each time
    into a *new* Parameter (``network_apply_direct``). fp32 add-then-subtract drifts by ~1e-8:
    that is the host's (its weights are compared with :func:`close_weights`), ours are compared
    bit for bit. Its network "hostnet" changes one UNet layer."""

    name = "lora"

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls: list[list[list[str]]] = []
        self.stepwise: list[str] = []  # '@' texts SD.Next evaluated itself
        self.fused: tuple = ()
        generator = torch.Generator().manual_seed(11)
        weight = pipe.unet.get_submodule(HOST_LAYER).weight
        self.delta = torch.randn(weight.shape, generator=generator) * float(weight.detach().std())

    def activate(self, p, params_list, step=0, include=None, exclude=None):
        self.calls.append([list(params.items) for params in params_list])
        wanted = tuple(
            (params.positional[0], m)
            for params in params_list
            if params.positional[0] == "hostnet" and (m := self.multiplier(params)) != 0
        )
        if wanted == self.fused:
            return
        module = self.pipe.unet.get_submodule(HOST_LAYER)
        with torch.no_grad():
            # network_deactivate then network_activate: ΔW subtracted from and added to the live
            # weight, each time into a new Parameter (network_apply_direct).
            for _, m in self.fused:
                module.weight = nn.Parameter(module.weight - m * self.delta, requires_grad=False)
            for _, m in wanted:
                module.weight = nn.Parameter(module.weight + m * self.delta, requires_grad=False)
        self.fused = wanted

    def multiplier(self, params) -> float:
        """extra_networks_lora.parse: float(), or loractl's get_stepwise at step 0 for a '@' text
        (its value at the first keyframe position)."""
        text = str(params.positional[1]) if len(params.positional) > 1 else "1"
        if "@" not in text:
            return float(text)
        self.stepwise.append(text)
        pairs = sorted((float(p), float(w)) for w, p in (kf.split("@") for kf in re.split("[,;]", text)))
        return pairs[0][1]

    def deactivate(self, p, force=False):
        pass


class ExtraNetworks:  # modules/extra_networks.py: activate / activate_filtered / registry
    def __init__(self, handler):
        self.extra_network_registry = {"lora": handler}

    def activate_filtered(self, p):
        import inspect

        apply_te = p.lora_apply_te if p.lora_apply_te is not None else False
        exclude = [] if apply_te else ["text_encoder", "text_encoder_2"]
        for name, args in p.network_data.items():
            handler = self.extra_network_registry.get(name)
            if handler is None:
                continue
            if "include" in inspect.signature(handler.activate).parameters:
                handler.activate(p, args, step=0, include=[], exclude=exclude)
            else:
                handler.activate(p, args, step=0)
        for name, handler in self.extra_network_registry.items():
            if name not in p.network_data:
                handler.activate(p, [], step=0, include=[], exclude=exclude)


class LoraIndex:  # modules/lora/lora_load.py: available_network_aliases
    def __init__(self, files):
        self.files = files
        self.available_network_aliases = {}
        self.listed = 0

    def list_available_networks(self):
        self.listed += 1
        self.available_network_aliases = {n: SimpleNamespace(filename=str(f)) for n, f in self.files.items()}


class State:  # shared.state
    interrupted = False


class P:
    """The parts of StableDiffusionProcessingTxt2Img the adapter touches."""

    def __init__(self, prompt, steps=STEPS, sampler="euler", n_iter=1, batch_size=1, seed=3,
                 enable_hr=False, hr_steps=3, denoise=0.5, lora_apply_te=None, enabled=True):
        self.prompt, self.steps, self.sampler, self.n_iter, self.batch_size = prompt, steps, sampler, n_iter, batch_size
        self.seed, self.enable_hr, self.hr_steps, self.denoise = seed, enable_hr, hr_steps, denoise
        self.lora_apply_te, self.enabled = lora_apply_te, enabled
        self.all_prompts, self.all_hr_prompts, self.hr_prompt, self.refiner_prompt = [], [], "", ""
        self.extra_generation_params, self.task_args = {}, {}
        self.network_data, self.is_hr_pass = {}, False
        self.initialised = False

    def init(self, all_prompts=None, all_seeds=None, all_subseeds=None):
        self.initialised = True


class SDNext:
    """The host: ``process_images(p)`` in SD.Next's order (see the module docstring)."""

    def __init__(self, pipe, files, fail_at=None):
        self.pipe = pipe
        opts = SimpleNamespace(lora_apply_te=False, scheduled_lora_mode="merge")  # weights probed per step
        self.shared = SimpleNamespace(sd_model=pipe, opts=opts, state=State())
        self.lora = HostLora(pipe)
        self.extra_networks = ExtraNetworks(self.lora)
        self.index = LoraIndex(files)
        self.host = sdnext.SDNextHost(self.shared, lambda: self.index)
        self.runtime = Runtime(self.host)
        self.integration = sdnext.SDNextIntegration(self.runtime, self.extra_networks, lambda: self.diffusers_callback)
        self.callbacks: list[tuple[str, int, float]] = []
        self.unet_calls: list[torch.Tensor] = []  # the probed layer's weight when it runs
        self.interrupt_at: int | None = None
        self.keep_incomplete = True
        # On the layer itself: it runs after every UNet pre-hook (ours set the weights there).
        self.hooks = [pipe.unet.get_submodule(PROBE).register_forward_pre_hook(self._probe)]

    def _probe(self, module, args):
        self.unet_calls.append(module.weight.detach().clone())

    # processing_callbacks.diffusers_callback: progress, then interrupt by raising AssertionError
    def diffusers_callback(self, pipe, step, timestep, kwargs):
        self.callbacks.append((type(pipe).__name__, step, float(timestep)))
        if self.interrupt_at is not None and step >= self.interrupt_at:
            self.shared.state.interrupted = True
        if self.shared.state.interrupted:
            raise AssertionError("Interrupted...")
        return kwargs

    # -- processing.py ----------------------------------------------------------------------------

    def process_images(self, p):
        self.shared.state.interrupted = False
        try:
            return self._inner(p)
        finally:
            self.integration.end_batch()  # script_callbacks.after_process_callback

    def _inner(self, p):
        p.all_prompts = p.prompt if isinstance(p.prompt, list) else p.batch_size * p.n_iter * [p.prompt]
        if p.enable_hr:
            p.all_hr_prompts = list(p.all_prompts)
        self.integration.begin(p, p.enabled)  # Script.process
        if not hasattr(p, "skip_init"):
            p.init(p.all_prompts, [], [])
        outputs = []
        for n in range(p.n_iter):
            if self.shared.state.interrupted:
                break
            p.iteration = n
            p.prompts = p.all_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            self.integration.before_batch(p, p.prompts)
            p.prompts, p.network_data = parse_prompts(p.prompts)
            self.integration.begin_batch(p)  # Script.process_batch
            output = self._process_diffusers(p)
            if self.shared.state.interrupted and not self.keep_incomplete:
                break
            self.integration.end_batch()  # Script.postprocess_batch
            outputs.append(output)
        if not self.shared.state.interrupted:
            self.integration.finish(p)  # Script.postprocess
        return outputs

    # -- processing_diffusers.py ------------------------------------------------------------------

    def _process_diffusers(self, p):
        orig = self.shared.sd_model
        try:
            output = self._process_base(p)
            if self.shared.state.interrupted or output is None:
                return None
            if p.enable_hr:
                output = self._process_hires(p, output)
            return output
        finally:
            self.shared.sd_model = orig

    def _call(self, p, pipe, steps, **extra):
        # set_pipeline_args: prompts encoded outside the pipeline (PromptEmbedder), then the call
        # with p.task_args merged in after SD.Next's own callback.
        embeds, negative = pipe.encode_prompt(p.prompts, "cpu", 1, True, [""] * len(p.prompts))
        args = dict(
            prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps, guidance_scale=5.0,
            generator=torch.Generator().manual_seed(p.seed), output_type="latent",
            callback_on_step_end=self.diffusers_callback,
        )
        args.update(p.task_args)
        args.update(extra)
        try:
            with torch.no_grad():
                return pipe(**args).images
        except AssertionError:
            return None  # process_base: log.info(e)
        except (ValueError, RuntimeError):
            self.shared.state.interrupted = True  # process_base: logged, the job goes on as interrupted
            return None

    def _process_base(self, p):
        pipe = self.shared.sd_model
        pipe.scheduler = make_scheduler(p.sampler, pipe.scheduler.config)
        p.prompts, p.network_data = parse_prompts(p.prompts, p.network_data)
        self.extra_networks.activate_filtered(p)
        return self._call(p, pipe, p.steps)

    def _process_hires(self, p, latents):
        from diffusers import StableDiffusionImg2ImgPipeline

        p.is_hr_pass = True
        if p.refiner_prompt:  # its networks replace the prompt's, activated again
            p.prompts, p.network_data = parse_prompts(len(p.prompts) * [p.refiner_prompt])
            self.extra_networks.activate_filtered(p)
        pipe = StableDiffusionImg2ImgPipeline(**self.shared.sd_model.components)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = make_scheduler(p.sampler, pipe.scheduler.config)
        self.shared.sd_model = pipe
        try:
            steps = int(p.hr_steps // p.denoise) + 1  # processing_helpers.calculate_hires_steps
            return self._call(p, pipe, steps, image=latents, strength=p.denoise)
        finally:
            p.is_hr_pass = False


PROBE = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"  # a layer of the scheduled network


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    from transformers import CLIPTextModel

    config = tiny_clip_config()
    config.vocab_size, config.bos_token_id, config.eos_token_id = 49408, 49406, 49407
    torch.manual_seed(0)
    pipe = tiny_pipeline(text_encoder=CLIPTextModel(config).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _layers(module: nn.Module, prefix: str, keep) -> list[Layer]:
    return [
        Layer(prefix + (name if not prefix.startswith("lora_te") or name.startswith("text_model.") else "text_model." + name).replace(".", "_"), tuple(m.weight.shape))
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and keep(name)
    ]


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    """"style": a kohya LoRA on the UNet's attention projections and the text encoder's."""
    folder = tmp_path_factory.mktemp("Lora")
    layers = _layers(pipe.unet, "lora_unet_", lambda n: ".attn" in n) + _layers(
        pipe.text_encoder, "lora_te_", lambda n: "self_attn" in n
    )
    style = write(random_network(layers, rank=4, seed=5, std=lambda layer, r: (0.5, 0.5)), folder / "style.safetensors")
    return {"style": style, "hostnet": style}


@pytest.fixture()
def host(pipe, files):
    sd = SDNext(pipe, files)
    yield sd
    for hook in sd.hooks:
        hook.remove()
    sd.integration.end_batch()
    sd.lora.activate(P(""), [])  # unfuse whatever the host stand-in left
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)


def snapshot(pipe):
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def same_weights(pipe, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in snapshot(pipe).items())


def close_weights(pipe, before) -> bool:
    """Equal up to the host's own fp32 add-then-subtract drift (far below any ΔW of ours)."""
    return all(torch.allclose(v, before[k], rtol=0, atol=1e-6) for k, v in snapshot(pipe).items())


def generate(host, prompt, **kw):
    p = P(prompt, **kw)
    outputs = host.process_images(p)
    return (outputs[0] if outputs else None), p


# -- tests ---------------------------------------------------------------------------------------


def test_constant_schedule_is_the_hosts_plain_tag(host, pipe):
    before = snapshot(pipe)
    plain, _ = generate(host, "a cat <lora:hostnet:0.8>")
    constant, _ = generate(host, "a cat <lora:hostnet:0.8@0,0.8@1>")
    assert torch.equal(plain, constant)
    assert host.lora.calls[-1] == [["hostnet", "0.8", "0.8"]]  # plain numbers: SD.Next never sees the '@'
    host.lora.activate(P(""), [])
    assert close_weights(pipe, before)


def test_scheduled_tag_equals_the_diffusers_adapter_and_restores_every_weight(host, pipe, files):
    """The SD.Next adapter is the diffusers adapter's machinery: with the same network and
    schedule, the same latents, to the bit; the host never sees the tag."""
    before = snapshot(pipe)
    host.shared.opts.scheduled_lora_mode = "auto"  # as attach() below: the same per-layer choices
    none, _ = generate(host, "a cat")
    scheduled, p = generate(host, "a cat <lora:style:0@0,1@1>")
    assert same_weights(pipe, before)
    assert host.lora.calls[-1] == []
    assert [round(e.position, 6) for e in p.scheduled_lora_state.trace] == [float(i) for i in range(STEPS)]
    assert [e.multipliers["style"] for e in p.scheduled_lora_state.trace] == [0, 0.2, 0.4, 0.6, 0.8, 1]

    network = load_network(files["style"], name="style")
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    with attach(pipe, [ScheduledNetwork(network, parse_schedule("0@0,1@1"), parse_schedule("0@0,1@1"))]):
        embeds, negative = pipe.encode_prompt(["a cat"], "cpu", 1, True, [""])
        with torch.no_grad():
            reference = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS,
                             guidance_scale=5.0, generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.equal(scheduled, reference)
    assert not torch.equal(scheduled, none)
    again, _ = generate(host, "a cat")
    assert torch.equal(again, none)


def test_step_zero_gets_its_weights_before_the_first_evaluation(host, pipe):
    """The step callback runs after each step; the UNet pre-hook sets step 0 too."""
    base = pipe.unet.get_submodule(PROBE).weight.detach().clone()
    generate(host, "a cat <lora:style:1@0,0@1>")
    assert len(host.unet_calls) == STEPS
    assert not torch.equal(host.unet_calls[0], base)  # multiplier 1 at step 0
    assert torch.equal(host.unet_calls[-1], base)  # 0 at the last step
    assert torch.equal(pipe.unet.get_submodule(PROBE).weight, base)


def test_heun_evaluations_sit_at_their_noise_levels(host, pipe):
    _, p = generate(host, "a cat <lora:style:0@0.5:1>", sampler="heun", steps=4)
    positions = [round(e.position, 6) for e in p.scheduled_lora_state.trace]
    assert positions == [0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert len(host.callbacks) == 7  # SD.Next's callback still runs for every evaluation


def test_the_hosts_fused_plain_lora_is_put_back_as_found(host, pipe):
    """SD.Next fuses its plain LoRA in place (a new Parameter) before the pipeline runs; our
    copies include it, and we give back exactly those weights (objects and values)."""
    generate(host, "a cat <lora:hostnet:0.7>")
    fused = snapshot(pipe)
    parameter = pipe.unet.get_submodule(HOST_LAYER).weight
    mixed, _ = generate(host, "a cat <lora:hostnet:0.7> <lora:style:0@0.3:1>")
    assert host.lora.calls[-1] == [["hostnet", "0.7"]]
    assert same_weights(pipe, fused)
    assert pipe.unet.get_submodule(HOST_LAYER).weight is parameter
    plain, _ = generate(host, "a cat <lora:hostnet:0.7>")
    assert not torch.equal(mixed, plain)
    assert same_weights(pipe, fused)


def test_interrupt_restores_before_the_host_touches_anything(host, pipe):
    before = snapshot(pipe)
    host.interrupt_at = 2
    latents, p = generate(host, "a cat <lora:style:0@0,1@1>", steps=20)
    assert latents is None and len(host.callbacks) == 3
    assert same_weights(pipe, before)
    assert host.integration.batch is None


def test_interrupt_without_keep_incomplete_skips_postprocess_batch(host, pipe):
    """postprocess_batch and postprocess do not run; on_after_process restores."""
    before = snapshot(pipe)
    host.interrupt_at, host.keep_incomplete = 1, False
    generate(host, "a cat <lora:style:0@0,1@1>", steps=20, n_iter=2)
    assert same_weights(pipe, before)
    assert not any(h for h in pipe.unet._forward_pre_hooks.values() if getattr(h, "__self__", None) is host.integration)


def test_exception_inside_the_unet_restores(host, pipe):
    """SD.Next logs a RuntimeError of the pipeline and goes on as interrupted (no callback ran
    for that step): on_after_process restores."""
    before = snapshot(pipe)

    def explode(module, args):
        if len(host.unet_calls) >= 3:
            raise RuntimeError("device lost")

    handle = pipe.unet.get_submodule(PROBE).register_forward_pre_hook(explode)
    try:
        latents, _ = generate(host, "a cat <lora:style:0@0,1@1>")
    finally:
        handle.remove()
    assert latents is None and host.shared.state.interrupted
    assert same_weights(pipe, before)


def test_hires_pass_runs_its_own_schedule_on_the_steps_it_runs(host, pipe):
    _, p = generate(host, "a cat <lora:style:0@0.3:1:hr=0@0.5:1>", enable_hr=True, hr_steps=4, denoise=0.5)
    state = p.scheduled_lora_state
    first = [e for e in state.trace if not e.hires]
    hires = [e for e in state.trace if e.hires]
    assert [e.position for e in first] == [float(i) for i in range(STEPS)]
    # (4 // 0.5) + 1 = 9 scheduler steps, the img2img pipeline runs the last 4: the pass is those.
    assert [e.position for e in hires] == [0.0, 1.0, 2.0, 3.0]
    assert [e.multipliers["style"] for e in hires] == [0, 0, 1, 1]
    assert [r.hires for r in state.passes] == [False, True]
    assert [c[0] for c in host.callbacks].count("StableDiffusionImg2ImgPipeline") == 4


def test_weights_are_back_before_sdnext_activates_again_for_hires(host, pipe):
    """With a refiner prompt SD.Next activates its networks again between the passes: our first
    pass must be closed by then (the step callback after the last step), or SD.Next would fuse
    onto our weights."""
    generate(host, "a cat <lora:hostnet:0.9>")
    expected = snapshot(pipe)
    p = P("a cat <lora:hostnet:0.5> <lora:style:0@0.3:1>", enable_hr=True)
    p.refiner_prompt = "a cat <lora:hostnet:0.9>"
    host.process_images(p)
    assert host.lora.calls[-1] == [["hostnet", "0.9"]]
    assert close_weights(pipe, expected)


def test_hires_items_keep_the_hosts_prompt_cache_apart(host, pipe):
    """SD.Next's prompt-embedding cache keys on the network items: the hires pass's te schedules
    need other items than the first pass's."""
    _, p = generate(host, "a cat <lora:style:0@0.3:1:hrte=1>", enable_hr=True)
    items = p.network_data["lora"][0].items
    assert items[0] == "style" and items[1].startswith("scheduled_lora=") and items[2] == "scheduled_lora_pass=hires"


def test_text_encoder_follows_the_hosts_lora_apply_te(host, pipe):
    seen = []
    layer = clip_text_transformer(pipe.text_encoder).get_submodule("encoder.layers.0.self_attn.q_proj")

    def record(module, args, output):
        seen.append(layer.weight.detach().clone())

    handle = pipe.text_encoder.register_forward_hook(record)  # before ours: runs while ours are in
    base = layer.weight.detach().clone()
    before = snapshot(pipe)
    try:
        generate(host, "a cat <lora:style:te=1@0,0@1:unet=0@0.5:1>")  # lora_apply_te off: SD.Next's default
        assert all(torch.equal(w, base) for w in seen)
        seen.clear()
        generate(host, "a cat <lora:style:te=1@0,0@1:unet=0@0.5:1>", lora_apply_te=True)
        assert seen and all(not torch.equal(w, base) for w in seen)
    finally:
        handle.remove()
    assert same_weights(pipe, before)


def test_bad_tags_stop_the_job_before_sampling(host, pipe):
    for prompt, message in [
        ("a cat <lora:style:0@0.3:abc>", "'abc' at column 19 is not a number"),
        ("a cat <lora:style:0@0.3:1:in=0.5>", "'in=0.5' at column 21 is an SD.Next per-block strength"),
        ("a cat <lora:hostnet:1:in=0@0,1@1>", "is a per-block schedule"),
        ("a cat <lora:hostnet:1:lbw=OUTS> <lora:style:0@0.3:1:start=3>", "LoRA Block Weight argument"),
    ]:
        p = P(prompt)
        with pytest.raises(ScheduleSyntaxError, match=re.escape(message)):
            host.process_images(p)
        assert not p.initialised and not host.unet_calls
    with pytest.raises(MissingNetworkError, match="'nothere'"):
        host.process_images(P("a cat <lora:nothere:0@0.3:1>"))


def test_sdnext_syntax_we_cannot_read_stays_the_hosts(host, pipe):
    """SD.Next's own positional words (``high``/``low`` for Wan) and per-block strengths on plain
    tags reach it untouched."""
    generate(host, "a cat <lora:hostnet:0.5:high> <lora:hostnet:0.6:in=0.5:out=1>")
    assert host.lora.calls[-1] == [["hostnet", "0.5", "high"], ["hostnet", "0.6", "in=0.5", "out=1"]]


def test_switched_off_everything_goes_to_the_host_unchanged(host, pipe):
    none, _ = generate(host, "a cat")
    off, p = generate(host, "a cat <lora:hostnet:0@0.3:1>", enabled=False)
    assert host.lora.calls[-1] == [["hostnet", "0@0.3", "1"]]  # SD.Next's own '@' handling, as without us
    assert host.lora.stepwise == ["0@0.3"]  # evaluated once, at step 0: 0, so the LoRA is skipped
    assert p.extra_generation_params["Scheduled LoRA"] == "off"
    assert torch.equal(off, none) and not p.scheduled_lora_state.trace


def test_batches_and_xyz_cells_wrap_the_step_callback_once(host, pipe):
    p = P("a cat <lora:style:0@0.5:1>", n_iter=2)
    host.process_images(p)
    callback = p.task_args["callback_on_step_end"]
    assert isinstance(callback, sdnext.StepEndCallback) and callback.original == host.diffusers_callback
    cell = copy.copy(p)  # XYZ: a shallow copy per cell, sharing task_args
    cell.prompt, cell.all_prompts = "a cat <lora:style:0@0.2:1>", []
    host.process_images(cell)
    assert cell.task_args["callback_on_step_end"] is callback
    assert len(cell.scheduled_lora_state.passes) == 2  # one pass per batch
    assert cell.init is not p.init  # the cell's own validation wrapper, not the copied one
    assert not host.lora.stepwise


def test_batch_warning_names_the_prompt_sdnext_uses(host, pipe, caplog):
    with caplog.at_level("WARNING", logger="scheduled_lora"):
        generate(host, ["a cat <lora:style:0@0.3:1>", "a dog <lora:style:0@0.6:1>", "a bird"], batch_size=3)
    assert "the whole batch uses prompt 2's networks" in caplog.text


def test_pipeline_grid_is_the_steps_it_runs():
    """img2img/hires pipelines run the last ``num_timesteps`` of the scheduler's timesteps."""
    scheduler = make_scheduler("heun", tiny_scheduler_config())
    scheduler.set_timesteps(5)
    full = scheduler_grid(scheduler)
    assert full.steps == 5
    trimmed = scheduler_grid(scheduler, evaluations=5)  # Heun: 2 steps = 3 evaluations... 3 steps = 5
    assert trimmed.steps == 3 and trimmed.values == full.values[2:]


def tiny_scheduler_config():
    from diffusers import DDIMScheduler

    return DDIMScheduler(steps_offset=1, clip_sample=False).config


def test_a_job_that_skips_p_init_still_gets_its_schedules(host, pipe):
    """SD.Next skips ``p.init`` for processing objects marked ``skip_init``: no validation
    there, but the tags are still ours and still applied."""
    p = P("a cat <lora:style:0@0.5:1>")
    p.skip_init = True
    host.process_images(p)
    assert [e.multipliers["style"] for e in p.scheduled_lora_state.trace] == [0, 0, 0, 1, 1, 1]
    assert host.lora.calls[-1] == []
