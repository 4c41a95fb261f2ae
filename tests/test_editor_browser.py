"""The schedule editor in a real browser: headless Chromium driven by Playwright.

Runs against tests/editor_page.html (same element ids as A1111's txt2img tab) and, when
``WEBUI_URL`` (a running WebUI) or ``WEBUI_PATH`` (a checkout to start on 127.0.0.1) is set,
against the real UI too (AUTOMATIC1111, Forge main, Forge Neo or SD.Next, told apart by
``WEBUI_PATH``: the ids that differ are in ``UI``). Uses the system's Chromium (Debian package ``chromium``), never a downloaded
browser; ``SCHEDULED_LORA_CHROMIUM`` overrides its path.

    apt-get install -y chromium && pip install playwright
    python -m pytest tests/test_editor_browser.py
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
from webui.server import current_kind, make_test_networks, running_webui

HERE = Path(__file__).resolve().parent
PAGE = HERE / "editor_page.html"
CHROMIUM = os.environ.get("SCHEDULED_LORA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

_MISSING = (
    "playwright is not installed (pip install playwright)" if sync_playwright is None
    else f"no Chromium at {CHROMIUM} (apt-get install -y chromium)" if not Path(CHROMIUM).exists()
    else None
)
if _MISSING and os.environ.get("CI"):
    # CI installs both (README "test-extras"): a skip there would hide a broken install step.
    raise RuntimeError(f"browser tests cannot run in CI: {_MISSING}")
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

SLOW = 30_000  # ms: generous, the CI machine is small and shared

# What differs between the hosts' UIs (the stand-alone page has A1111's ids). Second-order samplers:
# (name, where its extra evaluation sits: "end" at the next step, "mid" half-way).
UI = {
    "a1111": dict(
        hires="#txt2img_hr-visible-checkbox", hires_steps="#txt2img_hires_steps input[type=number]",
        img2img_tab="img2img", paste="#tab_txt2img #paste", second_order=[("DPM2", "mid"), ("DPM2 a", "end")],
    ),
    # Forge main and Neo keep A1111's ids (gradio 4 InputAccordion "txt2img_hr"); Neo has no
    # "DPM2 a" (its sampler list has Heun, DPM2, DPM++ SDE, Restart as second order): Heun is the
    # sampler that evaluates again at the next step's sigma there.
    "forge": dict(
        hires="#txt2img_hr-visible-checkbox", hires_steps="#txt2img_hires_steps input[type=number]",
        img2img_tab="img2img", paste="#tab_txt2img #paste", second_order=[("DPM2", "mid"), ("DPM2 a", "end")],
    ),
    "neo": dict(
        hires="#txt2img_hr-visible-checkbox", hires_steps="#txt2img_hires_steps input[type=number]",
        img2img_tab="img2img", paste="#tab_txt2img #paste", second_order=[("DPM2", "mid"), ("Heun", "end")],
    ),
    "sdnext": dict(
        hires="#txt2img_enable_hr input[type=checkbox]", hires_steps="#txt2img_steps_alt input[type=number]",
        img2img_tab="Image", paste="#txt2img_paste", second_order=[("KDPM2", "mid"), ("KDPM2 a", "end")],
    ),
}


def ui(tab) -> dict:
    return UI[current_kind() if tab.is_webui else "a1111"]


# -- browser and hosts -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 1000},
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def webui_url():
    """A running A1111 with the UI: WEBUI_URL as given, or WEBUI_PATH started for this module."""
    with running_webui(ui=True, need_path=False) as url:
        yield url


@pytest.fixture(params=["standalone", "webui"])
def page(request, browser):
    """A page with the editor mounted next to a prompt box, steps and hires inputs."""
    url = PAGE.as_uri() if request.param == "standalone" else request.getfixturevalue("webui_url")
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: None if _known_host_error(exc) else errors.append(f"{exc}\n{exc.stack}"))
    if request.param == "webui" and current_kind() == "sdnext":
        # SD.Next's UI keeps initialising for seconds after it shows (prompt checker, autocomplete,
        # its local prompt store): an edit in that time may be lost, as a user's typing would be.
        # Its startup logs "postStartup" to the console when done.
        with tab.expect_console_message(lambda m: "postStartup" in m.text, timeout=120_000):
            tab.goto(url)
    else:
        tab.goto(url)
    tab.wait_for_selector("#scheduled_lora_editor_txt2img.slora-mounted", state="attached", timeout=120_000)
    if request.param == "webui":
        _open_accordion(tab)
    tab.is_webui = request.param == "webui"
    yield tab
    tab.close()
    assert not errors, errors


def _known_host_error(exc) -> bool:
    """A1111 v1.10.1's own error, with or without this extension: toggling hires fix runs
    ``onCalcResolutionHires`` (javascript/hires_fix.js), which returns six values to a gradio
    event that has no outputs, and gradio 3.41 fails reading ``.props`` of the missing output."""
    stack = getattr(exc, "stack", "") or ""
    return "reading 'props'" in str(exc) and "/assets/Blocks-" in stack and "scheduled_lora" not in stack


def _open_accordion(tab, tab_name: str = "txt2img") -> None:
    """Open the accordion that holds a tab's editor (A1111 renders it closed)."""
    editor = f"#scheduled_lora_editor_{tab_name}"
    tab.eval_on_selector(editor, """el => {
        let node = el;
        while (node && !(node.querySelector && node.querySelector(':scope > .label-wrap'))) node = node.parentElement;
        const wrap = node && node.querySelector(':scope > .label-wrap');
        if (wrap && !wrap.classList.contains('open')) wrap.click();
    }""")
    tab.wait_for_function(f"document.querySelector('{editor}').clientWidth > 0")


# -- helpers -----------------------------------------------------------------------------------

PROMPT = "#txt2img_prompt textarea"


def set_prompt(tab, text: str) -> None:
    tab.fill(PROMPT, text)


def prompt(tab) -> str:
    return tab.input_value(PROMPT)


def wait_prompt(tab, expected: str) -> None:
    tab.wait_for_function("([sel, text]) => document.querySelector(sel).value === text", arg=[PROMPT, expected], timeout=SLOW)


def row(tab, index: int = 0):
    return tab.locator("#scheduled_lora_editor_txt2img .slora-row").nth(index)


def curve(tab, index: int = 0, pass_: str = "main"):
    return row(tab, index).locator(f'.slora-pass[data-pass="{pass_}"] svg.slora-curve')


def point(tab, index: int, u: float, v: float, pass_: str = "main") -> tuple[float, float]:
    """Page coordinates of step u, multiplier v on a row's curve (from the curve's own mapping)."""
    svg = curve(tab, index, pass_)
    svg.scroll_into_view_if_needed()
    frame = json.loads(svg.get_attribute("data-frame"))
    box = svg.bounding_box()
    sx, sy = box["width"] / frame["width"], box["height"] / frame["height"]
    x = frame["x0"] + (u - frame["uMin"]) / (frame["uMax"] - frame["uMin"]) * (frame["x1"] - frame["x0"])
    y = frame["y1"] - (v - frame["vMin"]) / (frame["vMax"] - frame["vMin"]) * (frame["y1"] - frame["y0"])
    return box["x"] + x * sx, box["y"] + y * sy


def handles(tab, index: int = 0, pass_: str = "main") -> list[tuple[float, float]]:
    found = curve(tab, index, pass_).locator(".slora-handle").evaluate_all(
        "hs => hs.map(h => [Number(h.dataset.pos), Number(h.dataset.value)])"
    )
    return [tuple(h) for h in found]


def dots(tab, index: int = 0, cls: str = "slora-dot", pass_: str = "main") -> list[tuple[float, float]]:
    found = curve(tab, index, pass_).locator(f"circle.{cls}").evaluate_all(
        "ds => ds.map(d => [Number(d.dataset.step), Number(d.dataset.value)])"
    )
    return [tuple(d) for d in found]


def set_input(tab, selector: str, value) -> None:
    """Set an input the way a user's drag does: value, then input and change events."""
    tab.eval_on_selector(selector, """(el, value) => {
        el.value = String(value);
        el.dispatchEvent(new Event('input', {bubbles: true}));
        el.dispatchEvent(new Event('change', {bubbles: true}));
    }""", value)


def set_steps(tab, steps: int) -> None:
    set_input(tab, "#txt2img_steps input[type=number]", steps)


def set_hires(tab, on: bool, steps: int = 0) -> None:
    box = tab.locator(ui(tab)["hires"])
    if box.is_checked() != on:
        if box.is_visible():
            box.click()
        else:  # SD.Next keeps it in a closed section: set it as gradio's own change does
            box.evaluate("(el, on) => { el.checked = on; el.dispatchEvent(new Event('change', {bubbles: true})); }", on)
    set_input(tab, ui(tab)["hires_steps"], steps)


def wait_rows(tab, count: int) -> None:
    tab.wait_for_function(
        "n => document.querySelectorAll('#scheduled_lora_editor_txt2img .slora-row').length === n", arg=count, timeout=SLOW
    )


# -- the prompt drives the rows ----------------------------------------------------------------


def test_rows_follow_the_prompt_live(page):
    set_prompt(page, "a cat <lora:wday:0@0.3:1>, <lyco:style:0.6> <hypernet:h:1>")
    wait_rows(page, 2)
    assert row(page, 0).get_attribute("data-name") == "wday"
    assert row(page, 1).get_attribute("data-name") == "style"
    set_prompt(page, "a cat <lora:renamed:0@0.3:1>, <lyco:style:0.6>")
    page.wait_for_function("document.querySelector('.slora-row').dataset.name === 'renamed'", timeout=SLOW)
    set_prompt(page, "a cat <lyco:style:0.6>")
    wait_rows(page, 1)
    assert row(page, 0).get_attribute("data-name") == "style"


def test_typed_tag_draws_its_keyframes_and_step_values(page):
    set_steps(page, 20)
    set_prompt(page, "<lora:wday:0@0.3:1>")
    wait_rows(page, 1)
    assert handles(page) == [(0.3, 0), (0.3, 1)]
    assert [v for _, v in dots(page)] == [0] * 6 + [1] * 14
    set_steps(page, 30)
    page.wait_for_function("document.querySelectorAll('.slora-row svg.slora-curve circle.slora-dot').length === 30")
    assert [v for _, v in dots(page)] == [0] * 9 + [1] * 21


def test_syntax_error_is_shown_and_nothing_is_rewritten(page):
    text = "x <lora:x:0@0.3:abc>"
    set_prompt(page, text)
    wait_rows(page, 1)
    error = row(page).locator(".slora-error")
    error.wait_for(state="visible", timeout=SLOW)
    assert error.inner_text() == "<lora:x:0@0.3:abc>: 'abc' at column 15 is not a number"
    assert not row(page).locator(".slora-body").is_visible()
    page.wait_for_timeout(500)
    assert prompt(page) == text


# -- drawing with the mouse --------------------------------------------------------------------


def test_draw_a_curve_with_the_mouse(page):
    set_steps(page, 20)
    set_prompt(page, "photo <lora:x:1>")
    wait_rows(page, 1)
    # Click at step 6, multiplier 0: a keyframe at the shortest position that lands on step 6.
    page.mouse.click(*point(page, 0, 6, 0))
    wait_prompt(page, "photo <lora:x:1@0,0@0.3>")
    # Drag it to step 10, multiplier 0.5.
    x, y = point(page, 0, 6, 0)
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(*point(page, 0, 8, 0.3), steps=3)
    page.mouse.move(*point(page, 0, 10, 0.5), steps=3)
    page.mouse.up()
    wait_prompt(page, "photo <lora:x:1@0,0.5@0.5>")
    assert handles(page) == [(0, 1), (0.5, 0.5)]
    # One drag is one undo step.
    curve(page).press("Control+z")
    wait_prompt(page, "photo <lora:x:1@0,0@0.3>")
    curve(page).press("Control+z")
    wait_prompt(page, "photo <lora:x:1>")
    curve(page).press("Control+Shift+z")
    wait_prompt(page, "photo <lora:x:1@0,0@0.3>")


def test_double_click_removes_and_jump_toggles(page):
    set_steps(page, 20)
    set_prompt(page, "<lora:x:0@0,1@0.5>")
    wait_rows(page, 1)
    page.mouse.click(*point(page, 0, 9.5, 1))  # selects the keyframe at 0.5
    curve(page).press("j")
    wait_prompt(page, "<lora:x:0@0,0@0.5:1>")
    curve(page).press("j")
    wait_prompt(page, "<lora:x:0@0,1@0.5>")
    page.mouse.dblclick(*point(page, 0, 9.5, 1))
    wait_prompt(page, "<lora:x:0>")


def test_keyboard_moves_the_selected_keyframe(page):
    set_steps(page, 20)
    set_prompt(page, "<lora:wday:0@0.3:1>")
    wait_rows(page, 1)
    page.mouse.click(*point(page, 0, 6, 1))  # the upper half of the jump
    readout = row(page).locator(".slora-readout").first
    assert "multiplier 1" in readout.inner_text()
    svg = curve(page)
    svg.press("ArrowRight")  # the whole jump moves one step: to step 7
    wait_prompt(page, "<lora:wday:0@0.36:1>")
    svg.press("ArrowLeft")
    wait_prompt(page, "<lora:wday:0@0.3:1>")
    svg.press("ArrowDown")
    wait_prompt(page, "<lora:wday:0@0.3:0.95>")
    svg.press("Control+z")
    wait_prompt(page, "<lora:wday:0@0.3:1>")
    svg.press("[")  # select the lower half, then remove it
    svg.press("Delete")
    wait_prompt(page, "<lora:wday:1@0.3>")


def test_negative_and_large_values_grow_the_axis(page):
    set_prompt(page, "<lora:x:-0.5@0.5:1.8>")
    wait_rows(page, 1)
    frame = json.loads(curve(page).get_attribute("data-frame"))
    assert frame["vMin"] <= -0.5 and frame["vMax"] >= 1.8


# -- presets, sliders, text encoder, hires -----------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("switch30", "<lora:x:0@0.3:0.8>"), ("ramp", "<lora:x:0@0,0.8@1>"), ("fade", "<lora:x:0.8@0,0@1>"), ("constant", "<lora:x:0.8>")],
)
def test_presets(page, preset, expected):
    set_prompt(page, "<lora:x:0.8>")
    wait_rows(page, 1)
    row(page).locator(f'.slora-pass[data-pass="main"] [data-preset="{preset}"]').click()
    wait_prompt(page, expected)


def test_sliders_write_before_switch_after(page):
    set_steps(page, 20)
    set_prompt(page, "<lora:x:1>")
    wait_rows(page, 1)
    main = '#scheduled_lora_editor_txt2img .slora-row .slora-pass[data-pass="main"]'
    set_input(page, f"{main} [data-slider=before]", 0)
    wait_prompt(page, "<lora:x:0@0.3:1>")  # a constant offers the usual 30 % switch
    set_input(page, f"{main} [data-slider=switch]", 10)
    wait_prompt(page, "<lora:x:0@0.5:1>")
    set_input(page, f"{main} [data-slider=after]", 0.75)
    wait_prompt(page, "<lora:x:0@0.5:0.75>")
    set_input(page, f"{main} [data-slider=before]", 0.2)
    wait_prompt(page, "<lora:x:0.2@0.5:0.75>")


def test_text_encoder_field(page):
    set_prompt(page, "<lora:x:0@0.3:1>")
    wait_rows(page, 1)
    te = row(page).locator(".slora-te-input")
    te.fill("1")
    te.press("Enter")
    wait_prompt(page, "<lora:x:1:0@0.3:1>")
    te.fill("0@0,1@oops")
    te.press("Enter")
    assert "'oops' at column 7 is not a number" in row(page).locator(".slora-te-error").inner_text()
    assert prompt(page) == "<lora:x:1:0@0.3:1>"
    row(page).locator('[data-action="te-link"]').click()
    wait_prompt(page, "<lora:x:0@0.3:1>")


def test_hires_curve(page):
    set_steps(page, 20)
    set_prompt(page, "<lora:x:0@0.3:1>")
    wait_rows(page, 1)
    set_hires(page, False)
    hires = row(page).locator('.slora-pass[data-pass="hires"]')
    page.wait_for_function("document.querySelector('.slora-pass[data-pass=hires]').hidden === true", timeout=SLOW)
    set_hires(page, True, 10)
    hires.wait_for(state="visible", timeout=SLOW)
    page.wait_for_function("document.querySelectorAll('.slora-pass[data-pass=hires] circle.slora-dot').length === 10", timeout=SLOW)
    hires.locator('[data-preset="ramp"]').click()
    wait_prompt(page, "<lora:x:0@0.3:1:hr=0@0,1@1>")
    page.mouse.click(*point(page, 0, 4.5, 0.5, "hires"))  # hires steps: 10, step 5 at 0.5
    wait_prompt(page, "<lora:x:0@0.3:1:hr=0@0,0.5@0.5,1@1>")
    hires.locator('[data-action="follow"]').click()
    wait_prompt(page, "<lora:x:0@0.3:1>")
    set_hires(page, False)


def choose_sampler(tab, name: str) -> None:
    """Pick a sampler as a user does: the page's <select>, or gradio's dropdown (type, pick)."""
    if tab.locator("#txt2img_sampling select").count():
        tab.select_option("#txt2img_sampling select", name)
        return
    box = tab.locator("#txt2img_sampling input").first
    box.click()
    box.fill(name)
    # gradio 3 (A1111, SD.Next) names an option in data-value, gradio 4 (Forge) in aria-label
    tab.locator(f'#txt2img_sampling ul.options li[data-value="{name}"], #txt2img_sampling ul.options li[aria-label="{name}"]').first.click()
    tab.wait_for_function(
        "name => document.querySelector('#txt2img_sampling input').value === name", arg=name, timeout=SLOW
    )


def test_second_order_sampler_dots(page):
    set_steps(page, 20)
    set_prompt(page, "<lora:x:0@0,1@1>")
    wait_rows(page, 1)
    choose_sampler(page, "Euler a")
    page.wait_for_timeout(300)
    assert dots(page, cls="slora-dot-extra") == []
    choose_sampler(page, "Heun")
    page.wait_for_function("document.querySelectorAll('circle.slora-dot-extra').length === 19", timeout=SLOW)
    assert [u for u, _ in dots(page, cls="slora-dot-extra")] == list(range(1, 20))
    (midpoint, _), (ancestral, _) = ui(page)["second_order"]
    choose_sampler(page, midpoint)
    page.wait_for_function("document.querySelector('circle.slora-dot-extra').dataset.step === '0.5'", timeout=SLOW)
    extra = dots(page, cls="slora-dot-extra")
    assert [u for u, _ in extra] == [i + 0.5 for i in range(19)]
    assert extra[0][1] == pytest.approx(0.5 / 19)
    # Ancestral DPM2 at eta 1 evaluates its midpoint at the next step's sigma (as Heun).
    choose_sampler(page, ancestral)
    page.wait_for_function("document.querySelector('circle.slora-dot-extra').dataset.step === '1'", timeout=SLOW)
    assert [u for u, _ in dots(page, cls="slora-dot-extra")] == list(range(1, 20))


def test_external_prompt_change_without_events_is_picked_up(page):
    """'Send to txt2img' and infotext paste set the value without an input event: the poll sees it."""
    set_prompt(page, "<lora:a:1>")
    wait_rows(page, 1)
    page.eval_on_selector(PROMPT, "el => { el.value = '<lora:a:1> <lora:b:0@0.3:1>'; }")
    wait_rows(page, 2)


# -- real host: a generation carries the drawn schedule ---------------------------------------


def _png_parameters(data: bytes) -> str:
    """The infotext of an image: a PNG's 'parameters' text chunk (A1111), or a JPEG's EXIF
    UserComment (SD.Next's gallery serves JPEGs)."""
    if data[:2] == b"\xff\xd8":
        import io

        from PIL import Image

        comment = Image.open(io.BytesIO(data)).getexif().get_ifd(0x8769).get(0x9286, b"")
        if isinstance(comment, bytes):
            head, body = comment[:8], comment[8:]
            return body.decode("utf-16-be" if head.startswith(b"UNICODE") else "latin-1", errors="replace")
        return str(comment)
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and body.startswith(b"parameters\0"):
            return body.split(b"\0", 1)[1].decode("latin-1")
        if kind == b"iTXt" and body.startswith(b"parameters\0"):
            rest = body.split(b"\0", 1)[1]
            compressed = rest[0]
            text = rest[2:].split(b"\0", 2)[2]
            return (zlib.decompress(text) if compressed else text).decode("utf-8")
        pos += 12 + length
    return ""


def _webui_network(tab) -> str:
    """A LoRA the WebUI knows: ``WEBUI_LORA``, else the integration tests' ``sl_lora`` (written
    into ``WEBUI_PATH``'s models/Lora for the loaded checkpoint when it is not there yet)."""
    base = tab.url.split("?")[0].rstrip("/")
    known = {entry["name"] for entry in tab.request.get(base + "/sdapi/v1/loras").json()}
    name = os.environ.get("WEBUI_LORA", "sl_lora")
    if name not in known and name == "sl_lora" and os.environ.get("WEBUI_PATH"):
        make_test_networks(
            lambda path: tab.request.get(base + path).json(), lambda path: tab.request.post(base + path)
        )
        known = {entry["name"] for entry in tab.request.get(base + "/sdapi/v1/loras").json()}
    if name not in known:
        pytest.skip(f"the WebUI has no LoRA named {name!r} (set WEBUI_LORA, or WEBUI_PATH to create sl_lora)")
    return name


def test_webui_generation_carries_the_drawn_schedule(page):
    if not page.is_webui:
        pytest.skip("needs the real WebUI (WEBUI_PATH or WEBUI_URL)")
    name = _webui_network(page)
    for size in ("width", "height"):  # the smallest image the WebUI makes: CPU hosts take seconds
        set_input(page, f"#txt2img_{size} input[type=number]", 64)
    set_steps(page, 8)
    set_prompt(page, f"a cat <lora:{name}:1>")
    wait_rows(page, 1)
    row(page).locator('.slora-pass[data-pass="main"] [data-preset="switch30"]').click()
    expected = f"<lora:{name}:0@0.3:1>"
    wait_prompt(page, f"a cat {expected}")
    page.click("#txt2img_generate")
    image = page.locator("#txt2img_gallery img").first
    image.wait_for(state="visible", timeout=600_000)
    src = image.get_attribute("src")
    data = page.request.get(src).body()
    assert expected in _png_parameters(data)


def test_img2img_tab_has_its_own_editor(page):
    """The img2img accordion's editor follows the img2img prompt, not the txt2img one."""
    if not page.is_webui:
        pytest.skip("needs the real WebUI (WEBUI_PATH or WEBUI_URL)")
    page.locator("#tabs > .tab-nav button", has_text=ui(page)["img2img_tab"]).click()
    editor = "#scheduled_lora_editor_img2img"
    _open_accordion(page, "img2img")
    page.fill("#img2img_prompt textarea", "a dog <lora:x:0@0.3:1> <lora:y:0.5>")
    page.wait_for_function(f"document.querySelectorAll('{editor} .slora-row').length === 2", timeout=SLOW)
    page.locator(f'{editor} .slora-row').first.locator('.slora-pass[data-pass="main"] [data-preset="ramp"]').click()
    page.wait_for_function(
        "() => document.querySelector('#img2img_prompt textarea').value === 'a dog <lora:x:0@0,1@1> <lora:y:0.5>'",
        timeout=SLOW,
    )
    assert page.locator("#scheduled_lora_editor_txt2img .slora-row").count() == 0
    assert prompt(page) == ""


def test_style_sheet_is_applied(page):
    """style.css reached the page (A1111 inlines extensions' style.css; the stand-alone page links it)."""
    set_prompt(page, "<lora:x:1>")
    wait_rows(page, 1)
    assert page.eval_on_selector(
        "#scheduled_lora_editor_txt2img", "el => getComputedStyle(el).flexDirection"
    ) == "column"
    assert page.eval_on_selector(
        "#scheduled_lora_editor_txt2img .slora-row", "el => getComputedStyle(el).borderTopStyle"
    ) == "solid"


def test_webui_infotext_paste_restores_our_settings(page):
    """'Read generation parameters' (↙️) restores the accordion's switch and the engine mode
    (as an override-settings entry) from a PNG's infotext, and the editor redraws the tag."""
    if not page.is_webui:
        pytest.skip("needs the real WebUI (WEBUI_PATH or WEBUI_URL)")
    enabled = page.locator("#scheduled_lora_enabled_txt2img input[type=checkbox]")
    assert enabled.is_checked()
    infotext = (
        "a cat <lora:wday:0@0.3:1>\n"
        "Steps: 7, Sampler: Euler, Seed: 5, Size: 64x64, Scheduled LoRA: off, Scheduled LoRA mode: bypass"
    )
    set_prompt(page, infotext)
    page.locator(ui(page)["paste"]).click()
    wait_prompt(page, "a cat <lora:wday:0@0.3:1>")
    page.wait_for_function(
        "() => !document.querySelector('#scheduled_lora_enabled_txt2img input[type=checkbox]').checked", timeout=SLOW
    )
    assert page.input_value("#txt2img_steps input[type=number]") == "7"
    overrides = page.locator("#txt2img_override_settings")
    page.wait_for_function(  # SD.Next keeps the overrides in a closed section: read the text, not the view
        "() => (document.querySelector('#txt2img_override_settings').textContent || '').includes('Scheduled LoRA mode: bypass')",
        timeout=SLOW,
    )
    assert "Scheduled LoRA mode: bypass" in overrides.text_content()
    wait_rows(page, 1)
    assert handles(page) == [(0.3, 0), (0.3, 1)]
    # An infotext without our key (made with the switch on) turns it back on.
    set_prompt(page, "a dog <lora:wday:0@0.3:1>\nSteps: 6, Sampler: Euler, Seed: 5, Size: 64x64")
    page.locator(ui(page)["paste"]).click()
    wait_prompt(page, "a dog <lora:wday:0@0.3:1>")
    page.wait_for_function(
        "() => document.querySelector('#scheduled_lora_enabled_txt2img input[type=checkbox]').checked", timeout=SLOW
    )
