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
from webui.server import make_test_networks, running_webui

pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


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
    page.locator(f"#{elem_id} label").filter(has_text=re.compile(f"^{re.escape(value)}$")).click()


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
    lines = [line for line in report.splitlines() if "from no network" in line]
    assert len(lines) == 9, report  # constant + two schedules, three strengths
    assert page.locator("#scheduled_lora_sweep_gallery img").count() >= 10  # the grid and nine cells
    page.screenshot(path=str(page.shots / "companion_sweep.png"), full_page=True)
    assert page.inner_text("#scheduled_lora_sweep_message").strip() == ""
    assert moved or page.locator(".progressDiv").count() == 0


def test_sweep_axes_go_to_the_xyz_plot(tab):
    page = tab
    _sub_tab(page, "Sweep")
    _fill(page, "scheduled_lora_sweep_prompt", "a cat <lora:sl_lora:1>")
    _fill(page, "scheduled_lora_sweep_x_values", "0.5, 1")
    _fill(page, "scheduled_lora_sweep_y_values", "0@0.3:1, 1")
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


def test_merge_runs_with_the_progress_bar(tab):
    page = tab
    _sub_tab(page, "Merge")
    _pick(page, "scheduled_lora_merge_operation", "Bake into checkpoint")
    options = page.request.get(page.url_base + "/sdapi/v1/options").json()
    page.locator("#scheduled_lora_merge_checkpoint input").first.fill(options["sd_model_checkpoint"])
    page.keyboard.press("Enter")
    _fill(page, "scheduled_lora_merge_networks", "sl_lora:0.7, sl_locon:-0.3")
    _fill(page, "scheduled_lora_merge_output", "browser-baked")
    _pick(page, "scheduled_lora_merge_overwrite", "Overwrite")
    page.click("#scheduled_lora_merge_run")
    _watch_progress(page, "companion_merge_progress.png")
    page.wait_for_function(
        "() => document.querySelector('#scheduled_lora_merge_report textarea').value.startsWith('wrote')",
        timeout=600_000,
    )
    report = page.input_value("#scheduled_lora_merge_report textarea")
    assert "browser-baked.safetensors" in report and "sl_lora at 0.7" in report and "sl_locon at -0.3" in report
    page.screenshot(path=str(page.shots / "companion_merge.png"), full_page=True)
    folder = Path(os.environ["WEBUI_PATH"]) / "models" / "Stable-diffusion"
    for suffix in (".safetensors", ".yaml"):
        (folder / f"browser-baked{suffix}").unlink(missing_ok=True)


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
