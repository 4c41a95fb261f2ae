"""AUTOMATIC1111 WebUI: the "Scheduled LoRA" tab (Merge and Sweep) and its API routes.

Imported by ``scripts/scheduled_lora_tab.py`` when the host is AUTOMATIC1111 or Forge (main and
Neo keep the modules used here: ``processing``, ``sd_models``, ``call_queue``, ``shared.state``).
The logic is host-independent (:mod:`lib_scheduled_lora.hosts.companion`, the core); this module builds the
widgets, gives the host's folders and model list, reports progress through the host's own state
(``shared.state``: the progress bar of the txt2img tab, its Interrupt), and runs sweep cells through
the host's own processing (``process_images`` with the txt2img scripts, as the X/Y/Z plot does).
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import gradio as gr
from modules import call_queue, processing, script_callbacks, scripts, sd_models, sd_samplers, shared

from lib_scheduled_lora.core.output_names import confined_output
from lib_scheduled_lora.core.sweep import KINDS, SweepPlan, cell_numbers, sweep_report
from lib_scheduled_lora.errors import Cancelled, RankRuleError, ScheduledLoraError
from lib_scheduled_lora.hosts import companion
from lib_scheduled_lora.hosts.sweep_grid import save_sweep, sweep_grid

OPERATIONS = ("Merge networks", "Bake into checkpoint", "Resize network", "Extract LoRA")
SHORT = {"from no network": "d0", "from full strength": "d1"}
_components: dict[str, Any] = {}  # txt2img widgets the Sweep tab fills ("Send to X/Y/Z plot")
_default_args: list[Any] | None = None


# -- the host's folders, models and state ---------------------------------------------------------


def folders() -> companion.Folders:
    lora_dir = getattr(shared.cmd_opts, "lora_dir", None) or str(Path(sd_models.paths.models_path) / "Lora")
    ckpt_dir = getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path
    return companion.Folders([Path(lora_dir)], [Path(ckpt_dir)])


def checkpoint_titles() -> list[str]:
    return sorted(sd_models.checkpoints_list)


def checkpoint_file(title: str | None, what: str = "checkpoint") -> Path:
    """A checkpoint from the host's own list (never a path typed by the user)."""
    info = sd_models.checkpoint_aliases.get(title or "") or sd_models.checkpoints_list.get(title or "")
    if info is None:
        raise RankRuleError(f"{what} {title!r}", "is not in the WebUI's checkpoint list (refresh it?)")
    return Path(info.filename)


def progress_from_state() -> companion.Progress:
    state = shared.state

    def show(label: str, done: int, total: int) -> None:
        state.job_count, state.job_no = 1, 0
        state.sampling_steps, state.sampling_step = total, done
        state.textinfo = f"Scheduled LoRA: {label} {done}/{total}"

    return companion.Progress(show, lambda: bool(state.interrupted))


def refresh_host_lists() -> None:
    import sys

    sd_models.list_models()
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


# -- merge ------------------------------------------------------------------------------------


def run_merge(operation, networks_text, checkpoint, tuned, rule, rank, conv_rank, param, dtype, output, overwrite) -> str:
    """The Merge tab's button (also the API's): one operation, its report as text."""
    where = folders()
    confined_output(where.checkpoints[0] if operation == "Bake into checkpoint" else where.networks[0], output)
    rule_obj = companion.rank_rule(rule, rank, conv_rank, param)
    progress = progress_from_state()
    if operation == "Bake into checkpoint":
        specs = companion.parse_network_specs(networks_text)
        outcome = companion.bake_checkpoint(
            checkpoint_file(checkpoint), specs, output, where, dtype=dtype, overwrite=overwrite, progress=progress,
        )
    elif operation == "Merge networks":
        specs = companion.parse_network_specs(networks_text)
        model = checkpoint_file(checkpoint) if checkpoint else None
        outcome = companion.merge_networks(
            specs, output, where, rule_obj, model=model, dtype=dtype, overwrite=overwrite, progress=progress
        )
    elif operation == "Resize network":
        specs = companion.parse_network_specs(networks_text)
        if len(specs) != 1 or rule_obj is None:
            raise RankRuleError("resize", "takes one network and a rank rule (not exact)")
        model = checkpoint_file(checkpoint) if checkpoint else None
        outcome = companion.merge_networks(
            [(specs[0][0], 1.0)], output, where, rule_obj, model=model, dtype=dtype, overwrite=overwrite,
            progress=progress, operation="resize",
        )
    elif operation == "Extract LoRA":
        if rule_obj is None:
            raise RankRuleError("extract", "needs a rank rule (not exact)")
        outcome = companion.extract_network(
            checkpoint_file(checkpoint, "base model"), checkpoint_file(tuned, "fine-tuned model"), output, where,
            rule_obj, dtype=dtype, overwrite=overwrite, progress=progress,
        )
    else:
        raise RankRuleError(str(operation), f"is not one of {', '.join(OPERATIONS)}")
    refresh_host_lists()
    return outcome.text()


def _merge_ui(id_task, *args):
    try:
        text = run_merge(*args)
    except ScheduledLoraError as exc:
        return "", f"<div class='error'>{_html(str(exc))}</div>"
    return text, ""


# -- sweep ------------------------------------------------------------------------------------


def _script_args() -> list[Any]:
    """Every txt2img script's default arguments (what the API uses; our own: enabled)."""
    global _default_args
    if _default_args is None:
        runner = scripts.scripts_txt2img
        last = max([1] + [s.args_to for s in runner.scripts])
        args: list[Any] = [None] * last
        args[0] = 0
        with gr.Blocks():
            for script in runner.scripts:
                controls = script.ui(script.is_img2img)
                if controls:
                    args[script.args_from : script.args_to] = [c.value for c in controls]
        _default_args = args
    return list(_default_args)


def _generate(prompt: str, settings: dict[str, Any]):
    """One image through the host's own txt2img processing (its scripts and extensions)."""
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model,
        outpath_samples=shared.opts.outdir_samples or shared.opts.outdir_txt2img_samples,
        outpath_grids=shared.opts.outdir_grids or shared.opts.outdir_txt2img_grids,
        prompt=prompt,
        do_not_save_samples=True,
        do_not_save_grid=True,
        n_iter=1,
        batch_size=1,
        **settings,
    )
    # The seed/sampler/steps widgets are scripts that copy their UI values into p in setup() (run
    # as soon as script_args is set); as for the API, p's own fields are the settings here, so
    # those UI-only setups are skipped.
    p.is_api = True
    p.scripts = scripts.scripts_txt2img
    p.script_args = tuple(_script_args())
    try:
        processed = processing.process_images(p)
    finally:
        p.close()
    if shared.state.interrupted:
        raise Cancelled("sweep interrupted")
    return processed.images[0], processed.infotexts[0]


def run_sweep(plan: SweepPlan, settings: dict[str, Any], with_numbers: bool = True) -> dict[str, Any]:
    """Every cell (and the two references) with one locked seed; returns the grid, the cells'
    images and the report, and writes the grid and its JSON into the txt2img grids folder."""
    settings = dict(settings, seed=processing.get_fixed_seed(settings.get("seed", -1)))
    references = plan.references() if with_numbers else {}
    shared.state.job_count = len(plan.cells) + len(references)
    shared.state.job_no = 0
    ref_images = {}
    for label, prompt in references.items():
        ref_images[label], _ = _generate(prompt, settings)
    images, infotexts, numbers = [], [], []
    for cell in plan.cells:
        image, infotext = _generate(cell.prompt, settings)
        images.append(image)
        infotexts.append(infotext)
        numbers.append(cell_numbers(image, ref_images) if with_numbers else {})
    notes = [" ".join(f"{SHORT.get(k, k)} {v:.2f}" for k, v in n.items()) for n in numbers]
    title = f"{plan.prompt} | seed {settings['seed']}, {settings.get('sampler_name')}, {settings.get('steps')} steps"
    grid = sweep_grid(plan, images, cell_notes=notes, title=title)
    report = sweep_report(plan, numbers=numbers, infotexts=infotexts, settings={k: v for k, v in settings.items() if k != "prompt"})
    folder = Path(shared.opts.outdir_grids or shared.opts.outdir_txt2img_grids).resolve() / "scheduled-lora-sweeps"
    png, json_path = save_sweep(grid, folder / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{settings['seed']}.png", report, infotexts[0])
    return {"grid": grid, "images": images, "report": report, "png": png, "json": json_path}


def _settings(negative, steps, sampler, width, height, cfg, seed, hires) -> dict[str, Any]:
    settings = dict(
        negative_prompt=negative, steps=int(steps), sampler_name=sampler, width=int(width), height=int(height),
        cfg_scale=float(cfg), seed=int(seed),
    )
    if hires:
        settings.update(enable_hr=True, hr_scale=2.0, hr_upscaler=_hires_upscaler(), denoising_strength=0.6)
        if "hr_additional_modules" in getattr(processing.StableDiffusionProcessingTxt2Img, "__dataclass_fields__", {}):
            # Forge (main, Neo) reads the hires pass's module choice and fails on None: keep the first pass's.
            settings["hr_additional_modules"] = ["Use same choices"]
    return settings


def _hires_upscaler() -> str:
    """"Latent" where the host has latent upscalers; Forge Neo has none (its "Latent" is no latent
    mode there), so its plain resize, "None"."""
    return "Latent" if "Latent" in (getattr(shared, "latent_upscale_modes", None) or {}) else "None"


def _sweep_ui(id_task, prompt, negative, network, x_kind, x_values, y_kind, y_values, same_mean, numbers,
              steps, sampler, width, height, cfg, seed, hires):
    try:
        plan = companion.sweep_plan(prompt, network, x_kind, x_values, y_kind, y_values, same_mean=same_mean, steps=int(steps))
        result = run_sweep(plan, _settings(negative, steps, sampler, width, height, cfg, seed, hires), numbers)
    except ScheduledLoraError as exc:
        return [], "", f"<div class='error'>{_html(str(exc))}</div>"
    temp_dir = getattr(shared.opts, "temp_dir", "")
    if temp_dir:
        # gradio saves the gallery's images there; Forge Neo (2026-08) creates its default "tmp"
        # folder only when the setting changes (ui_tempdir.on_tmpdir_changed), not at start.
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
    cells = [
        f"{c['schedule']}: " + ", ".join(f"{k} {v:.3f}" for k, v in c["numbers"].items())
        for c in result["report"]["cells"]
    ]
    text = "\n".join([f"grid: {result['png']}", f"numbers: {result['json']}", *cells])
    return [result["grid"], *result["images"]], text, ""


def _send_to_xyz(prompt, network, x_kind, x_values, y_kind, y_values, same_mean, steps):
    """The sweep's axes as the X/Y/Z plot's (the txt2img tab's script, selected and filled)."""
    try:
        plan = companion.sweep_plan(prompt, network, x_kind, x_values, y_kind, y_values, same_mean=same_mean, steps=int(steps))
    except ScheduledLoraError as exc:
        return [gr.update()] * 6 + [f"<div class='error'>{_html(str(exc))}</div>"]
    fields = companion.xyz_fields(plan)
    (x_label, x_text), (y_label, y_text) = fields[0], (fields[1] if len(fields) > 1 else ("Nothing", ""))
    return [
        gr.update(value="X/Y/Z plot"), gr.update(value=x_label), gr.update(value=x_text),
        gr.update(value=y_label), gr.update(value=y_text), gr.update(value=plan.prompt),
        f"X: {x_label} = {x_text}<br>Y: {y_label} = {y_text}",
    ]


def _png64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _html(text: str) -> str:
    import html

    return html.escape(text)


# -- the tab ----------------------------------------------------------------------------------


def on_ui_tabs():
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Tabs(elem_id="scheduled_lora_tabs"):
            with gr.Tab("Merge", elem_id="scheduled_lora_merge_tab"):
                _merge_tab()
            with gr.Tab("Sweep", elem_id="scheduled_lora_sweep_tab"):
                _sweep_tab()
    return [(tab, "Scheduled LoRA", "scheduled_lora")]


def _merge_tab() -> None:
    id_task = gr.Textbox(visible=False, elem_id="scheduled_lora_merge_task")
    with gr.Row():
        operation = gr.Radio(list(OPERATIONS), value=OPERATIONS[0], label="Operation", elem_id="scheduled_lora_merge_operation")
    networks = gr.Textbox(
        label="Networks (name:strength, comma-separated; names as in <lora:name>)", elem_id="scheduled_lora_merge_networks"
    )
    with gr.Row():
        checkpoint = gr.Dropdown(
            checkpoint_titles(), label="Checkpoint (bake: the model; merge/resize: optional base for IA3, DoRA, LoHa; extract: the base)",
            elem_id="scheduled_lora_merge_checkpoint",
        )
        tuned = gr.Dropdown(checkpoint_titles(), label="Fine-tuned checkpoint (extract)", elem_id="scheduled_lora_merge_tuned")
        refresh = gr.Button("Refresh lists", elem_id="scheduled_lora_merge_refresh")
    with gr.Row():
        rule = gr.Radio(list(companion.RULES), value="exact", label="Rank rule (exact: concatenated ranks, LoRA/LoCon only)",
                        elem_id="scheduled_lora_merge_rule")
        rank = gr.Number(value=0, precision=0, label="Rank (cap for sv_*)", elem_id="scheduled_lora_merge_rank")
        conv_rank = gr.Number(value=0, precision=0, label="Conv rank (0: the rank)", elem_id="scheduled_lora_merge_conv_rank")
        param = gr.Number(value=0.9, label="sv_* parameter", elem_id="scheduled_lora_merge_param")
    with gr.Row():
        dtype = gr.Dropdown(["fp16", "bf16", "fp32", "keep"], value="fp16", label="Output dtype (keep: bake only)",
                            elem_id="scheduled_lora_merge_dtype")
        output = gr.Textbox(label="Output name (written to the Lora or checkpoint folder)", elem_id="scheduled_lora_merge_output")
        overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id="scheduled_lora_merge_overwrite")
    with gr.Row():
        run = gr.Button("Run", variant="primary", elem_id="scheduled_lora_merge_run")
        interrupt = gr.Button("Interrupt", elem_id="scheduled_lora_merge_interrupt")
    gr.HTML('<div id="scheduled_lora_merge_progress"></div>')
    report = gr.Textbox(label="Report", lines=8, interactive=False, elem_id="scheduled_lora_merge_report")
    message = gr.HTML(elem_id="scheduled_lora_merge_message")

    def refreshed():
        refresh_host_lists()
        titles = checkpoint_titles()
        return gr.update(choices=titles), gr.update(choices=titles)

    refresh.click(refreshed, outputs=[checkpoint, tuned])
    interrupt.click(lambda: shared.state.interrupt())
    run.click(
        call_queue.wrap_gradio_gpu_call(_merge_ui, extra_outputs=["", ""]),
        _js="scheduled_lora_submit_merge",
        inputs=[id_task, operation, networks, checkpoint, tuned, rule, rank, conv_rank, param, dtype, output, overwrite],
        outputs=[report, message],
    )


def _sweep_tab() -> None:
    id_task = gr.Textbox(visible=False, elem_id="scheduled_lora_sweep_task")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt (with the network's tag)", lines=2, elem_id="scheduled_lora_sweep_prompt")
        use_txt2img = gr.Button("Use txt2img prompt", elem_id="scheduled_lora_sweep_use_txt2img")
    negative = gr.Textbox(label="Negative prompt", elem_id="scheduled_lora_sweep_negative")
    network = gr.Textbox(label="Network (empty: the prompt's only one)", elem_id="scheduled_lora_sweep_network")
    kinds = list(KINDS)
    with gr.Row():
        x_kind = gr.Dropdown(kinds, value="strength", label="X axis", elem_id="scheduled_lora_sweep_x_kind")
        x_values = gr.Textbox(value="0.5-1.5 [3]", label="X values (XYZ syntax: 0.25-2 (+0.25), 0-0.8 [5], a, b)",
                              elem_id="scheduled_lora_sweep_x_values")
    with gr.Row():
        y_kind = gr.Dropdown(["none", *kinds], value="schedule", label="Y axis", elem_id="scheduled_lora_sweep_y_kind")
        y_values = gr.Textbox(value="0@0.3:1, 0@0;1@1", label="Y values (schedules: ';' between keyframes)",
                              elem_id="scheduled_lora_sweep_y_values")
    with gr.Row():
        same_mean = gr.Checkbox(label="Same mean strength (schedules scaled to each strength's mean)", value=False,
                                elem_id="scheduled_lora_sweep_same_mean")
        numbers = gr.Checkbox(label="Numbers (distance from no network / network at 1)", value=True,
                              elem_id="scheduled_lora_sweep_numbers")
        hires = gr.Checkbox(label=f"Hires fix (x2, {_hires_upscaler()})", value=False, elem_id="scheduled_lora_sweep_hires")
    with gr.Row():
        steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="scheduled_lora_sweep_steps")
        sampler = gr.Dropdown(sd_samplers.visible_sampler_names(), value="Euler", label="Sampler", elem_id="scheduled_lora_sweep_sampler")
        width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="scheduled_lora_sweep_width")
        height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="scheduled_lora_sweep_height")
        cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG scale", elem_id="scheduled_lora_sweep_cfg")
        seed = gr.Number(value=-1, precision=0, label="Seed (-1: one random seed for every cell)", elem_id="scheduled_lora_sweep_seed")
    with gr.Row():
        run = gr.Button("Run sweep", variant="primary", elem_id="scheduled_lora_sweep_run")
        interrupt = gr.Button("Interrupt", elem_id="scheduled_lora_sweep_interrupt")
        send = gr.Button("Send to X/Y/Z plot", elem_id="scheduled_lora_sweep_send_xyz")
    gr.HTML('<div id="scheduled_lora_sweep_progress"></div>')
    gallery = gr.Gallery(label="Sweep", elem_id="scheduled_lora_sweep_gallery", columns=4)
    report = gr.Textbox(label="Cells", lines=6, interactive=False, elem_id="scheduled_lora_sweep_report")
    message = gr.HTML(elem_id="scheduled_lora_sweep_message")

    interrupt.click(lambda: shared.state.interrupt())
    use_txt2img.click(None, _js="scheduled_lora_txt2img_prompt", inputs=[prompt], outputs=[prompt])
    run.click(
        call_queue.wrap_gradio_gpu_call(_sweep_ui, extra_outputs=[[], ""]),
        _js="scheduled_lora_submit_sweep",
        inputs=[id_task, prompt, negative, network, x_kind, x_values, y_kind, y_values, same_mean, numbers,
                steps, sampler, width, height, cfg, seed, hires],
        outputs=[gallery, report, message],
    )
    targets = [_components.get(k) for k in ("script", "x_type", "x_values", "y_type", "y_values", "prompt")]
    if all(t is not None for t in targets):
        send.click(
            _send_to_xyz,
            inputs=[prompt, network, x_kind, x_values, y_kind, y_values, same_mean, steps],
            outputs=[*targets, message],
        )
    else:
        send.click(lambda: "<div class='error'>the X/Y/Z plot script was not found in txt2img</div>", outputs=[message])


def on_after_component(component, **kwargs) -> None:
    """Keep the txt2img widgets "Send to X/Y/Z plot" fills (the first ``script_list`` is txt2img's)."""
    names = {
        "script_txt2img_xyz_plot_x_type": "x_type", "script_txt2img_xyz_plot_x_values": "x_values",
        "script_txt2img_xyz_plot_y_type": "y_type", "script_txt2img_xyz_plot_y_values": "y_values",
        "txt2img_prompt": "prompt",
    }
    # setdefault: the first of each (the API's default-argument pass builds throwaway copies later)
    elem_id = kwargs.get("elem_id")
    if elem_id in names:
        _components.setdefault(names[elem_id], component)
    elif elem_id == "script_list":
        _components.setdefault("script", component)


# -- the API ----------------------------------------------------------------------------------


def api_routes(app) -> None:
    """POST /scheduled-lora/v1/merge and /scheduled-lora/v1/sweep (see README)."""
    from fastapi import Body
    from fastapi.responses import JSONResponse

    def error(exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": type(exc).__name__, "detail": str(exc)})

    @app.post("/scheduled-lora/v1/merge")
    def merge(body: dict = Body(...)):  # noqa: B008 - FastAPI's way of taking a JSON body
        fields = dict(
            operation=body.get("operation", "Merge networks"),
            networks_text=", ".join(f"{n['name']}:{n.get('strength', 1)}" for n in body.get("networks", [])),
            checkpoint=body.get("checkpoint"), tuned=body.get("tuned"), rule=body.get("rule", "exact"),
            rank=body.get("rank"), conv_rank=body.get("conv_rank"), param=body.get("param"),
            dtype=body.get("dtype", "fp16"), output=body.get("output", ""), overwrite=bool(body.get("overwrite", False)),
        )
        with call_queue.queue_lock:
            shared.state.begin(job="scheduled_lora_merge")
            try:
                text = run_merge(*fields.values())
            except ScheduledLoraError as exc:
                return error(exc)
            finally:
                shared.state.end()
        return {"report": text}

    @app.post("/scheduled-lora/v1/sweep")
    def sweep(body: dict = Body(...)):  # noqa: B008
        x, y = body.get("x") or {}, body.get("y") or {}
        try:
            plan = companion.sweep_plan(
                body.get("prompt", ""), body.get("network"), x.get("kind", "strength"), str(x.get("values", "")),
                y.get("kind"), str(y.get("values", "")) if y else None,
                same_mean=bool(body.get("same_mean", False)), steps=int(body.get("steps", 20)),
            )
        except ScheduledLoraError as exc:
            return error(exc)
        settings = _settings(
            body.get("negative_prompt", ""), body.get("steps", 20), body.get("sampler_name", "Euler"),
            body.get("width", 512), body.get("height", 512), body.get("cfg_scale", 7), body.get("seed", -1),
            bool(body.get("enable_hr", False)),
        )
        if body.get("xyz_only"):
            return {"xyz": [{"axis": label, "values": text} for label, text in companion.xyz_fields(plan)]}
        with call_queue.queue_lock:
            shared.state.begin(job="scheduled_lora_sweep")
            try:
                result = run_sweep(plan, settings, bool(body.get("numbers", True)))
            except ScheduledLoraError as exc:
                return error(exc)
            finally:
                shared.state.end()
        return {
            "grid": _png64(result["grid"]),
            "images": [_png64(image) for image in result["images"]] if body.get("images") else [],
            "report": json.loads(json.dumps(result["report"])),
            "files": [str(result["png"]), str(result["json"])],
            "xyz": [{"axis": label, "values": text} for label, text in companion.xyz_fields(plan)],
        }


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_after_component(on_after_component)
script_callbacks.on_app_started(lambda demo, app: api_routes(app))
