"""The built-in demo model: shipped weights load offline, follow the prompt, and the concept
network does its job; the demo command writes its grid. Fixed seeds, a few seconds on a CPU."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lib_scheduled_lora.demo import metrics, world  # noqa: E402
from lib_scheduled_lora.demo import model as demo  # noqa: E402

NETWORK_FILES = ("wday", "wday_locon", "wday_loha")


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return demo.load_demo_pipeline("cpu")


def _generate(pipe, prompts, seeds, steps=12, networks=()):
    from lib_scheduled_lora.core.engine import EngineSettings
    from lib_scheduled_lora.hosts.diffusers import attach

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with attach(pipe, list(networks), EngineSettings()):
        return pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, generator=gens).images


def _scheduled(name, text):
    from lib_scheduled_lora.core.engine import ScheduledNetwork
    from lib_scheduled_lora.core.networks.loader import load_network
    from lib_scheduled_lora.core.schedule import parse_schedule

    sched = parse_schedule(text)
    return ScheduledNetwork(network=load_network(demo.network_path(name)), te=sched, unet=sched)


def test_shipped_files_are_small_and_present():
    files = [
        demo.WEIGHTS_DIR / n
        for n in ("unet.safetensors", "text_encoder.safetensors", "config.json", "tokenizer.json")
    ]
    files += [demo.network_path(n) for n in NETWORK_FILES]
    for f in files:
        assert f.is_file(), f
    assert sum(f.stat().st_size for f in files) < 12 * 2**20


def test_tokenizer_round_trip_and_padding(pipe):
    ids = pipe.tokenizer(["a white wday", "a red circle on a blue background"], return_tensors="pt").input_ids
    assert ids.shape == (2, demo.MAX_LENGTH)
    assert pipe.tokenizer.decode(ids[0]) == "a white wday"
    assert ids[0, 4] == pipe.tokenizer.eos_token_id and ids[0, 5:].eq(pipe.tokenizer.pad_token_id).all()
    assert pipe.tokenizer("zebra").input_ids[1] == pipe.tokenizer.unk_token_id


@pytest.mark.parametrize("name", NETWORK_FILES)
def test_networks_load_with_kohya_unet_keys(name):
    from lib_scheduled_lora.core.networks.loader import load_network

    net = load_network(demo.network_path(name))
    assert len(net.modules) >= 8
    assert all(key.startswith("lora_unet_") for key in net.modules)
    algorithms = {m.algorithm for m in net.modules.values()}
    assert algorithms == ({"loha"} if name.endswith("loha") else {"lora"})
    if name == "wday":  # plain LoRA: attention/MLP linears only; LoCon/LoHa also the ResNet convs
        assert not any("resnets" in key for key in net.modules)
    else:
        assert any("resnets" in key for key in net.modules)


def test_colour_words_change_the_colour(pipe):
    colours = ("red", "blue", "white", "yellow")
    seeds = (0, 1, 2)
    prompts = [f"a {c} circle on a green background" for c in colours for _ in seeds]
    images = _generate(pipe, prompts, [s for _ in colours for s in seeds])
    hits, means = [], {}
    for i, c in enumerate(colours):
        batch = images[len(seeds) * i : len(seeds) * (i + 1)]
        hits += [metrics.colour_hit(im, c) for im in batch]
        found = [m for m in (metrics.subject_colour(im) for im in batch) if m is not None]
        assert found, c
        means[c] = np.mean(found, axis=0)
    # most images have the requested colour (the nearest of all eight palette colours) ...
    assert np.mean(hits) >= 0.6, hits
    # ... and each colour word's mean subject colour is nearest to that word's colour
    for c, m in means.items():
        nearest = min(colours, key=lambda k: np.linalg.norm(m - np.array(world.COLOURS[k])))
        assert nearest == c, (c, means)
    for a in colours:
        for b in colours:
            if a < b:
                assert np.linalg.norm(means[a] - means[b]) > 0.25, (a, b, means)


@pytest.mark.parametrize("name", NETWORK_FILES)
def test_concept_network_raises_the_concept_metric(pipe, name):
    seeds = (0, 1, 2, 3)
    prompts = ["a wday"] * len(seeds)
    base = np.mean([metrics.concept_fidelity(im) for im in _generate(pipe, prompts, seeds)])
    images = _generate(pipe, prompts, seeds, networks=[_scheduled(name, "1")])
    concept = np.mean([metrics.concept_fidelity(im) for im in images])
    # the base model never draws the checker (~0.02); the network trained on it does
    assert base < 0.05, base
    assert concept > max(3 * base, base + 0.05), (base, concept)
    # and, being trained on black wdays only, it turns "a wday" black (colour hit for black)
    assert np.mean([metrics.colour_hit(im, "black") for im in images]) >= 0.5


def test_demo_command_writes_its_png(tmp_path):
    from PIL import Image

    from lib_scheduled_lora.commands import demo as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "demo.png"
    args = parser.parse_args(
        [
            "--out",
            str(out),
            "--seeds",
            "1",
            "--steps",
            "6",
            "--schedule",
            "base",
            "--schedule",
            "1",
            "--schedule",
            "0@0.3:1",
        ]
    )
    torch.set_num_threads(1)
    assert command.run(args) == 0
    image = Image.open(out)
    assert image.format == "PNG"
    assert image.width > 3 * world.SIZE * 4 and image.height > 2 * world.SIZE * 4


@pytest.mark.parametrize("file", ["text_encoder.safetensors", "unet.safetensors"])
def test_a_missing_weight_is_an_error_not_a_random_layer(tmp_path, file):
    import shutil

    from safetensors.torch import load_file, save_file

    from lib_scheduled_lora.errors import ModelFormatError

    copy = tmp_path / "weights"
    shutil.copytree(demo.WEIGHTS_DIR, copy)
    state = load_file(copy / file)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, copy / file)
    with pytest.raises(ModelFormatError, match=rf"{file}: does not match the demo model: 1 missing key"):
        demo.load_demo_pipeline("cpu", copy)


# -- the grid's words ------------------------------------------------------------------------------


def test_cell_metrics_say_what_can_be_measured():
    from dataclasses import replace

    rng = np.random.default_rng(7)
    wday = world.sample_scene(rng, concept=True)
    red_wday = replace(wday, colour="red", background="yellow")
    m = metrics.describe(world.render(red_wday), "red")
    assert m.subject_found and m.colour == "red" and m.colour_hit
    assert m.checker is not None and m.checker > 0.5 and m.both  # the checker, on the asked colour
    assert not metrics.describe(world.render(red_wday), "white").colour_hit
    # a subject of the background's colour: nothing to measure, said so rather than 0.00
    hidden = replace(wday, colour="white", background="white", texture="plain")
    m = metrics.describe(world.render(hidden), "white")
    assert not m.subject_found and m.checker is None and not m.both
    assert metrics.concept_fidelity(world.render(hidden)) == 0.0  # the bench's number is unchanged


def test_takeaway_is_computed_from_the_cells():
    from lib_scheduled_lora.commands.demo import Column, _takeaway

    columns = [Column("base model", None, True), Column("constant 2", "2", True), Column("step", "0@0.3:2", False)]
    text = _takeaway(columns, [0, 1, 3], 8)
    assert "'step' gives the asked colour with the checker in 3/8" in text
    assert "the best constant strength ('constant 2') in 1/8" in text
    assert "No setting" in _takeaway(columns, [0, 0, 0], 8)
    assert "constant 2' gives" in _takeaway(columns, [0, 2, 1], 8) and "best constant" not in _takeaway(columns, [0, 2, 1], 8)
    assert "No prompt asks for a colour" in _takeaway(columns, [0, 0, 0], 0)


def test_demo_grid_labels_wrap_long_tags_inside_their_column():
    from PIL import Image, ImageDraw

    from lib_scheduled_lora.demo.grid import _wrap, font

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    face = font(12)
    lines = _wrap(draw, "step at 0.3 to 3 <lora:wday_locon:0@0.3:3>", 128, face)
    assert all(draw.textlength(line, font=face) <= 128 for line in lines)
    assert "".join(lines).replace(" ", "") == "stepat0.3to3<lora:wday_locon:0@0.3:3>"


def test_the_demo_pipeline_draws_its_progress_bar_when_asked(pipe):
    import io

    stream = io.StringIO()
    pipe.set_progress_bar_config(disable=False, file=stream)
    try:
        pipe(["a wday"], num_inference_steps=3, generator=[torch.Generator().manual_seed(0)])
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "3/3" in stream.getvalue()


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io

    from lib_scheduled_lora.commands.progress import show_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not show_progress()  # captured or piped: no carriage-return lines in the way
    monkeypatch.setattr("sys.stderr", Terminal())
    assert show_progress() and not show_progress(quiet=True)
