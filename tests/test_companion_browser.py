"""The "Scheduled LoRA" tab in the real A1111 UI, in headless Chromium (Playwright): it renders,
runs a small sweep and a merge with the WebUI's own progress bar, and sends a sweep's axes to the
txt2img X/Y/Z plot. Needs WEBUI_PATH (or WEBUI_URL) like the editor's browser tests; screenshots go
to SCHEDULED_LORA_SCREENSHOTS (default: the test's temporary folder)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from test_editor_browser import _MISSING, CHROMIUM, CHROMIUM_ARGS, SLOW, sync_playwright
from webui.server import SDNEXT, current_kind, make_test_networks, running_webui

pytestmark = [
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
    pytest.mark.skipif(current_kind() == SDNEXT, reason="the companion tab is not on SD.Next yet"),
]


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    import tempfile

    with running_webui(ui=True, need_path=True) as url, sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, viewport={"width": 1400, "height": 1300}
        )
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)) if "scheduled_lora" in (exc.stack or "") else None)
        page.goto(url)
        page.wait_for_selector("#scheduled_lora_tabs", state="attached", timeout=180_000)
        known = {entry["name"] for entry in page.request.get(url + "/sdapi/v1/loras").json()}
        if "sl_lora" not in known:
            make_test_networks(lambda path: page.request.get(url + path).json(), lambda path: page.request.post(url + path))
        _top_tab(page, "Scheduled LoRA")
        page.wait_for_selector("#scheduled_lora_merge_run", state="visible", timeout=SLOW)
        page.shots = Path(os.environ.get("SCHEDULED_LORA_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
        page.shots.mkdir(parents=True, exist_ok=True)
        page.url_base = url
        yield page
        context.close()
        assert not errors, errors


def _top_tab(page, name: str) -> None:
    page.locator("#tabs > .tab-nav > button").filter(has_text=re.compile(f"^\\s*{re.escape(name)}\\s*$")).click()


def _sub_tab(page, name: str) -> None:
    page.locator("#scheduled_lora_tabs > .tab-nav > button").filter(has_text=re.compile(f"^\\s*{name}\\s*$")).click()


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text], #{elem_id} input[type=number]").first
    box.fill(value)
    box.press("Tab")


def _pick(page, elem_id: str, value: str) -> None:
    """Tick a radio choice (by its value) or a checkbox (``value`` ignored)."""
    radio = page.locator(f"#{elem_id} input[type=radio][value=\"{value}\"]")
    (radio if radio.count() else page.locator(f"#{elem_id} input[type=checkbox]")).check()


def _watch_progress(page, name: str) -> bool:
    """Wait for the host's progress bar to show progress (or at least appear); screenshot it."""
    page.wait_for_selector(".progressDiv", state="attached", timeout=SLOW)
    try:
        page.wait_for_function(
            "() => { const d = document.querySelector('.progressDiv .progress');"
            " return d && parseFloat(d.style.width || '0') > 0; }",
            timeout=20_000,
        )
        moved = True
    except Exception:  # noqa: BLE001 - a very fast run may end before the first poll
        moved = False
    page.screenshot(path=str(page.shots / name), full_page=True)
    return moved


def test_sweep_runs_with_the_progress_bar(tab):
    page = tab
    _sub_tab(page, "Sweep")
    _fill(page, "scheduled_lora_sweep_prompt", "a cat <lora:sl_lora:1>")
    _fill(page, "scheduled_lora_sweep_x_values", "0.5, 1, 1.5")
    _fill(page, "scheduled_lora_sweep_y_values", "0@0.3:1, 0@0;1@1")
    _pick(page, "scheduled_lora_sweep_same_mean", "Same mean strength (schedules scaled to each strength's mean)")
    for elem_id, value in (("steps", "6"), ("width", "64"), ("height", "64"), ("seed", "1234")):
        _fill(page, f"scheduled_lora_sweep_{elem_id}", value)
    page.click("#scheduled_lora_sweep_run")
    moved = _watch_progress(page, "companion_sweep_progress.png")
    page.wait_for_function(
        "() => document.querySelector('#scheduled_lora_sweep_report textarea').value.includes('numbers:')",
        timeout=600_000,
    )
    report = page.input_value("#scheduled_lora_sweep_report textarea")
    for line in report.splitlines():  # the grid and its JSON, in the WebUI's grids folder
        if line.startswith(("grid: ", "numbers: ")):
            written = Path(line.split(": ", 1)[1])
            assert written.is_file()
            written.unlink()
    lines = [line for line in report.splitlines() if "from no network" in line]
    assert len(lines) == 9, report  # constant + two schedules, three strengths
    page.wait_for_selector(".progressDiv", state="detached", timeout=SLOW)  # the host saw the task end
    page.wait_for_function(
        "() => [...document.querySelectorAll('#scheduled_lora_sweep_gallery img')].filter(i => i.complete && i.naturalWidth).length >= 10",
        timeout=SLOW,
    )  # the grid and nine cells
    page.screenshot(path=str(page.shots / "companion_sweep.png"), full_page=True)
    assert page.locator("#scheduled_lora_sweep_message .error").count() == 0
    assert moved, "the progress bar never showed progress"


def test_sweep_axes_go_to_the_xyz_plot(tab):
    page = tab
    _sub_tab(page, "Sweep")
    _fill(page, "scheduled_lora_sweep_prompt", "a cat <lora:sl_lora:1>")
    _fill(page, "scheduled_lora_sweep_x_values", "0.5, 1")
    _fill(page, "scheduled_lora_sweep_y_values", "0@0.3:1, 1")
    page.locator("#scheduled_lora_sweep_same_mean input[type=checkbox]").uncheck()
    page.click("#scheduled_lora_sweep_send_xyz")
    page.wait_for_function(
        "() => (document.querySelector('#script_txt2img_xyz_plot_x_values textarea') || {}).value === 'sl_lora=0.5, sl_lora=1'",
        timeout=SLOW,
    )
    assert page.input_value("#script_txt2img_xyz_plot_y_values textarea") == "sl_lora=0@0.3:1, sl_lora=1"
    assert page.input_value("#txt2img_prompt textarea") == "a cat <lora:sl_lora:1>"
    _top_tab(page, "txt2img")
    page.wait_for_selector("#script_txt2img_xyz_plot_x_values", state="visible", timeout=SLOW)
    page.screenshot(path=str(page.shots / "companion_sent_to_xyz.png"), full_page=True)
    _top_tab(page, "Scheduled LoRA")


@pytest.fixture
def big_checkpoint(tab):
    """An SD 1.5-sized checkpoint (2 GB, real layer names and shapes, random values) and a rank-8
    LoRA for it in the WebUI's folders, so that a bake lasts long enough to watch its progress."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bake_memory
    from support.random_networks import random_network, write

    webui = Path(os.environ["WEBUI_PATH"]) / "models"
    checkpoint, lora = webui / "Stable-diffusion" / "sl-browser-sd15.safetensors", webui / "Lora" / "sl_big.safetensors"
    shapes = bake_memory.checkpoint_shapes("sd15")
    bake_memory.write_checkpoint(checkpoint, shapes)
    write(random_network(bake_memory.lora_layers(shapes), rank=8, seed=3), lora)
    for route in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras"):
        tab.request.post(tab.url_base + route)
    yield checkpoint.name
    for path in (checkpoint, lora, webui / "Stable-diffusion" / "browser-baked.safetensors"):
        path.unlink(missing_ok=True)
    for route in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras"):
        tab.request.post(tab.url_base + route)


def test_merge_runs_with_the_progress_bar(tab, big_checkpoint):
    page = tab
    _sub_tab(page, "Merge")
    _pick(page, "scheduled_lora_merge_operation", "Bake into checkpoint")
    page.click("#scheduled_lora_merge_refresh")
    page.wait_for_timeout(2000)
    page.locator("#scheduled_lora_merge_checkpoint input").first.fill(big_checkpoint)
    page.keyboard.press("Enter")
    _fill(page, "scheduled_lora_merge_networks", "sl_big:0.7")
    _fill(page, "scheduled_lora_merge_output", "browser-baked")
    _pick(page, "scheduled_lora_merge_overwrite", "Overwrite")
    page.click("#scheduled_lora_merge_run")
    assert _watch_progress(page, "companion_merge_progress.png"), "the progress bar never showed progress"
    page.wait_for_function(
        "() => document.querySelector('#scheduled_lora_merge_report textarea').value.startsWith('wrote')",
        timeout=600_000,
    )
    page.wait_for_selector(".progressDiv", state="detached", timeout=SLOW)
    report = page.input_value("#scheduled_lora_merge_report textarea")
    assert "browser-baked.safetensors" in report and "sl_big at 0.7: 192 layer(s) merged" in report
    page.screenshot(path=str(page.shots / "companion_merge.png"), full_page=True)

    # Interrupt in the middle of a bake: a one-line message, and nothing left in the folder
    folder = Path(os.environ["WEBUI_PATH"]) / "models" / "Stable-diffusion"
    before = sorted(p.name for p in folder.iterdir())
    _fill(page, "scheduled_lora_merge_output", "browser-cancelled")
    page.click("#scheduled_lora_merge_run")
    page.wait_for_function(
        "() => { const d = document.querySelector('.progressDiv .progress');"
        " return d && parseFloat(d.style.width || '0') > 0; }",
        timeout=SLOW,
    )
    page.click("#scheduled_lora_merge_interrupt")
    page.wait_for_function(
        "() => document.querySelector('#scheduled_lora_merge_message').innerText.includes('cancelled; nothing was written')",
        timeout=SLOW,
    )
    page.screenshot(path=str(page.shots / "companion_merge_interrupted.png"), full_page=True)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_bad_output_name_is_one_line_in_the_tab(tab):
    page = tab
    _sub_tab(page, "Merge")
    _pick(page, "scheduled_lora_merge_operation", "Merge networks")
    _fill(page, "scheduled_lora_merge_networks", "sl_lora")
    _fill(page, "scheduled_lora_merge_output", "../outside")
    page.click("#scheduled_lora_merge_run")
    page.wait_for_function(
        "() => document.querySelector('#scheduled_lora_merge_message').innerText.includes('without folders')",
        timeout=SLOW,
    )
