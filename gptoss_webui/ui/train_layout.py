"""The Train tab's widgets, placed and labelled; no event is bound here (train_tab.wire does that)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from gptoss_webui.presets import DEFAULT_PRESET, default_recipe, preset_names
from gptoss_webui.train.data import LOCAL_SUFFIXES
from gptoss_webui.ui import runview
from gptoss_webui.ui.form import FIELDS, form_values
from gptoss_webui.ui.i18n import Localizer
from gptoss_webui.ui.widgets import widget

POLL_S = 2.0

Component = Any  # a gradio component

# The groups that hold only form fields, row by row (the data and GPU groups, with more in them, are placed below).
FIELD_ROWS = {
    "train.group.lora": [("train.lora_r", "train.lora_alpha", "train.lora_dropout"),
                         ("train.lora_targets", "train.lora_experts", "train.lora_layers")],
    "train.group.memory": [("train.checkpointing", "train.offload_activations", "train.ds_stage",
                            "train.offload_optimizer", "train.offload_params"),
                           ("train.precision", "train.base_weights", "train.attention", "train.compile")],
    "train.group.schedule": [("train.micro_batch", "train.grad_accum", "train.lr"),
                             ("train.epochs", "train.max_steps", "train.save_steps")],
}


@dataclass
class TrainWidgets:
    # the form
    preset: Component
    preset_desc: Component
    base: Component  # gr.State: the preset's (or a past run's) recipe, under the form's values
    fields: list[Component]  # one per form.FIELDS entry, in that order
    data_path: Component
    upload: Component
    extra: Component
    preview_btn: Component
    preview: Component
    preview_msg: Component
    # the memory gate and launch
    estimate: Component
    fix_state: Component
    apply_fix: Component
    breakdown: Component
    force: Component
    start: Component
    show_cmd: Component
    reason: Component
    cmd_group: Component
    cmd_yaml: Component
    cmd_line: Component
    # the runs
    run_pick: Component
    refresh_runs: Component
    run_state: Component
    progress: Component
    metrics: Component
    plot: Component
    stop: Component
    resume: Component
    reuse: Component
    log: Component
    seen: Component  # gr.State: what the last poll showed, to skip unchanged updates
    timer: Component


def layout(L: Localizer, runs_dir: str) -> TrainWidgets:
    recipe0 = default_recipe()
    values0 = dict(zip((f.key for f in FIELDS), form_values(recipe0), strict=True))
    placed: dict[str, Component] = {}

    def place(*keys: str) -> None:
        for f in FIELDS:
            if f.key in keys:
                placed[f.key] = widget(L, f, value=values0[f.key])

    with gr.Row():
        preset = L.labelled(gr.Dropdown, "train.preset", choices=preset_names(),
                            value=DEFAULT_PRESET if DEFAULT_PRESET in preset_names() else None, scale=1)
        preset_desc = gr.Markdown(recipe0.description, elem_classes="gw-muted")
    base = gr.State(recipe0.model_dump(mode="json"))

    with L.accordion("train.group.data", open=True):
        with gr.Row():
            place("train.model")
            place("train.data_path")
            upload = L.bind(gr.UploadButton(L("train.upload"), file_types=list(LOCAL_SUFFIXES), size="sm",
                                            scale=1), label="train.upload")
        with gr.Row():
            place("train.data_format", "train.max_length", "train.packing")
        preview_btn = L.button("train.preview_btn", size="sm")
        preview = L.labelled(gr.HighlightedText, "train.preview", show_legend=True, combine_adjacent=True,
                             visible=False, elem_id="gw-preview")
        preview_msg = gr.Markdown()
    for group, rows in FIELD_ROWS.items():
        with L.accordion(group, open=True):
            for keys in rows:
                with gr.Row():
                    place(*keys)
    with L.accordion("train.group.gpus", open=True):
        with gr.Row():
            place("train.num_gpus", "train.gpu_memory", "train.run_name")
        extra = L.labelled(gr.Textbox, "train.extra", lines=2, placeholder="optim.warmup_ratio=0.1")

    L.markdown("train.estimate_title_md")
    estimate = gr.Markdown(elem_id="gw-estimate")
    fix_state = gr.State([])
    apply_fix = L.button("train.apply_fix", size="sm", visible=False, elem_id="gw-apply-fix")
    with L.accordion("train.breakdown", open=False):
        breakdown = gr.Code(language=None, interactive=False, show_label=False, elem_id="gw-breakdown")
    with gr.Row():
        force = L.labelled(gr.Checkbox, "train.force", scale=1)
        start = L.button("train.start", variant="primary", elem_id="gw-start", scale=2)
        show_cmd = L.button("train.show_cmd", scale=1)
    reason = gr.Markdown(elem_id="gw-start-reason")
    with gr.Group(visible=False) as cmd_group:
        cmd_yaml = L.labelled(gr.Code, "train.cmd_yaml", language="yaml", interactive=False)
        cmd_line = L.labelled(gr.Code, "train.cmd_line", language="shell", interactive=False, lines=2,
                              elem_id="gw-cmd-line")

    L.markdown("train.runs_title_md")
    with gr.Row():
        run_pick = L.labelled(gr.Dropdown, "train.run_pick", choices=runview.run_names(runs_dir), value=None,
                              scale=4, elem_id="gw-run-pick")
        refresh_runs = L.button("train.refresh", size="sm", scale=1)
    run_state = gr.Markdown(elem_id="gw-run-state")
    progress = gr.HTML(elem_id="gw-progress")
    metrics = gr.Markdown(elem_id="gw-metrics")
    plot = L.labelled(gr.LinePlot, "train.loss_plot", x="step", y="loss", height=260,
                      elem_id="gw-loss-plot")
    with gr.Row():
        stop = L.button("train.stop", variant="stop", interactive=False, elem_id="gw-stop")
        resume = L.button("train.resume", interactive=False, elem_id="gw-resume")
        reuse = L.button("train.reuse")
    log = L.labelled(gr.Textbox, "train.log", lines=10, max_lines=10, interactive=False, autoscroll=True,
                     elem_id="gw-log")

    return TrainWidgets(
        preset=preset, preset_desc=preset_desc, base=base, fields=[placed[f.key] for f in FIELDS],
        data_path=placed["train.data_path"], upload=upload, extra=extra, preview_btn=preview_btn, preview=preview,
        preview_msg=preview_msg, estimate=estimate, fix_state=fix_state, apply_fix=apply_fix, breakdown=breakdown,
        force=force, start=start, show_cmd=show_cmd, reason=reason, cmd_group=cmd_group, cmd_yaml=cmd_yaml,
        cmd_line=cmd_line, run_pick=run_pick, refresh_runs=refresh_runs, run_state=run_state, progress=progress,
        metrics=metrics, plot=plot, stop=stop, resume=resume, reuse=reuse, log=log, seen=gr.State(None),
        timer=gr.Timer(POLL_S))
