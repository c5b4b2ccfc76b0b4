"""The Train tab: a form bound to Recipe.train, the memory gate, launch/stop/resume, and live progress.

Every action calls the same function the CLI calls (train.launcher, train.memory, train.data.preview);
progress is read from the run folder on a gr.Timer, so closing the page never stops or loses a run.
"""

from __future__ import annotations

import html
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from gptoss_webui.config import ConfigError, Recipe
from gptoss_webui.logs import tail
from gptoss_webui.paths import workspace_dir
from gptoss_webui.presets import DEFAULT_PRESET, default_recipe, load_preset, preset_names
from gptoss_webui.runs import RunsDir
from gptoss_webui.ui import runview
from gptoss_webui.ui.access import outside_paths, redact
from gptoss_webui.ui.form import (
    FIELDS,
    apply_to_form,
    form_values,
    recipe_from_form,
    workspace_choices,
)
from gptoss_webui.ui.i18n import Localizer, note, t, warn
from gptoss_webui.ui.widgets import widget

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
POLL_S = 2.0


@dataclass
class TrainTab:
    on_load: tuple[Any, ...]  # (fn, inputs, outputs): the page runs it on load to reattach


# --- form -> config -> estimate / command -------------------------------------------------------

def _recipe(runs_dir: str, lang: str, base: dict, extra: str, values: list[Any]) -> Recipe:
    """The form as a validated Recipe; paths outside the workspace are refused (see access.outside_paths)."""
    recipe = recipe_from_form(base, values, extra, runs_dir)
    if refused := outside_paths(recipe, runs_dir):
        raise ConfigError(t("msg.path_outside", lang, what=refused[0]))
    return recipe


def estimate_view(recipe: Recipe, force: bool, lang: str) -> tuple[str, str, bool, str, list[str]]:
    """(verdict markdown, breakdown text, start enabled?, reason, the fix as --set overrides)."""
    try:
        from gptoss_webui.train.memory import estimate_for_recipe
    except ImportError:
        return t("train.estimate_missing", lang), "", True, "", []
    try:
        est = estimate_for_recipe(recipe.train)
    except ConfigError as exc:  # e.g. an architecture it cannot read: launch will say more
        return t("train.estimate_failed", lang, error=exc), "", True, "", []
    except Exception as exc:  # a bug in the estimate must not lock the form
        return t("train.estimate_failed", lang, error=f"{type(exc).__name__}: {exc}"), "", True, "", []
    if est.gpu_gib is None:
        head = t("train.no_gpu", lang, total=f"{est.total_gib:.1f}")
    elif est.fits:
        head = t("train.fits", lang, total=f"{est.total_gib:.1f}", gpu=f"{est.gpu_gib:.1f}",
                 margin=f"{est.margin_gib:.1f}")
    else:
        head = t("train.no_fit", lang, total=f"{est.total_gib:.1f}", gpu=f"{est.gpu_gib:.1f}",
                 margin=f"{-est.margin_gib:.1f}")
    fix = getattr(est, "fix", None)
    overrides = list(fix.overrides) if fix and not est.fits else []
    if overrides:
        head += "\n\n" + t("train.fix", lang, change=fix.change, overrides=" ".join(overrides),
                            margin=f"{fix.margin_gib:.1f}")
    report = est.report()
    if est.fits:
        return head, report, True, "", overrides
    if force:
        return head, report, True, t("train.forced", lang), overrides
    return head, report, False, t("train.blocked", lang), overrides


def command_view(recipe: Recipe, runs_dir: str) -> tuple[str, str]:
    yaml_path = str(Path(runs_dir) / (recipe.train.run_name or "<run-name>") / "config.yaml")
    try:
        from gptoss_webui.train.launcher import command_line
    except ImportError:
        return recipe.to_yaml(), f"python -m gptoss_webui train --config {yaml_path}"
    return recipe.to_yaml(), command_line(yaml_path)


# --- progress rendering --------------------------------------------------------------------------

def progress_html(v: runview.RunView, lang: str) -> str:
    pct = int(v.fraction * 100)
    eta = t("train.eta", lang, eta=runview.fmt_duration(v.eta_s)) if v.state == "running" else ""
    label = t("train.progress", lang, step=v.step, total=v.total or "?", pct=pct)
    return (f'<div class="gw-progress" data-step="{v.step}" data-total="{v.total}">'
            f'<div class="gw-bar" style="width:{pct}%"></div></div>'
            f'<div class="gw-progress-label">{html.escape(label)} {html.escape(eta)}</div>')


def metrics_md(v: runview.RunView, lang: str) -> str:
    def num(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, int | float) else "–"

    text = t("train.metrics", lang, loss=num(v.loss, ".4f"), lr=num(v.lr, ".2e"),
             tps=num(v.tokens_per_s, ",.0f"), mem=num(v.peak_mem_gib, ".2f"),
             elapsed=runview.fmt_duration(v.elapsed_s))
    if v.eval_losses:
        step, loss = v.eval_losses[-1]
        text += " · " + t("train.eval_loss", lang, loss=f"{loss:.4f}", step=step)
    if v.data:
        d = v.data
        text += "  \n" + t("train.data_stats", lang, examples=f"{d['examples']:,}", rows=f"{d['rows']:,}",
                            truncated=f"{d['truncated']:,}", dropped=f"{d['dropped']:,}", blocks=f"{d['blocks']:,}",
                            padding=f"{d['padding']:.1%}", unpacked=f"{d['padding_unpacked']:.1%}")
    return text


def state_md(v: runview.RunView, lang: str) -> str:
    text = f"**{v.name}** · {t('state.' + v.state, lang)}"
    if v.final and v.final.get("type") == "done":
        text += " · " + t("train.adapter_at", lang, path=v.final.get("adapter_path", ""))
    if v.error and v.state == "failed":
        text += "\n\n" + t("train.failed_with", lang, error=redact(v.error))
    if v.queue_place:
        text += " · " + t("train.queued", lang, place=v.queue_place)
    return text


# --- the tab -------------------------------------------------------------------------------------

def build(L: Localizer, lang: gr.Radio, runs_dir: str) -> TrainTab:  # noqa: C901 - one layout function
    recipe0 = default_recipe()
    values0 = dict(zip((f.key for f in FIELDS), form_values(recipe0), strict=True))
    widgets: dict[str, gr.components.Component] = {}

    def place(*keys: str) -> None:
        for f in FIELDS:
            if f.key in keys:
                widgets[f.key] = widget(L, f, value=values0[f.key])

    with gr.Row():
        preset = L.labelled(gr.Dropdown, "train.preset", choices=preset_names(),
                            value=DEFAULT_PRESET if DEFAULT_PRESET in preset_names() else None, scale=1)
        preset_desc = gr.Markdown(recipe0.description, elem_classes="gw-muted")
    base = gr.State(recipe0.model_dump(mode="json"))

    with L.accordion("train.group.data", open=True):
        with gr.Row():
            place("train.model")
            place("train.data_path")
            upload = L.bind(gr.UploadButton(L("train.upload"), file_types=list(DATA_SUFFIXES), size="sm",
                                            scale=1), label="train.upload")
        with gr.Row():
            place("train.data_format", "train.max_length", "train.packing")
        preview_btn = L.button("train.preview_btn", size="sm")
        preview = L.labelled(gr.HighlightedText, "train.preview", show_legend=True, combine_adjacent=True,
                             visible=False, elem_id="gw-preview")
        preview_msg = gr.Markdown()
    with L.accordion("train.group.lora", open=True):
        with gr.Row():
            place("train.lora_r", "train.lora_alpha", "train.lora_dropout")
        with gr.Row():
            place("train.lora_targets", "train.lora_experts", "train.lora_layers")
    with L.accordion("train.group.memory", open=True):
        with gr.Row():
            place("train.checkpointing", "train.ds_stage", "train.offload_optimizer", "train.offload_params")
        with gr.Row():
            place("train.precision", "train.base_weights", "train.attention", "train.compile")
    with L.accordion("train.group.schedule", open=True):
        with gr.Row():
            place("train.micro_batch", "train.grad_accum", "train.lr")
        with gr.Row():
            place("train.epochs", "train.max_steps", "train.save_steps")
    with L.accordion("train.group.gpus", open=True):
        with gr.Row():
            place("train.num_gpus", "train.gpu_memory", "train.run_name")
        extra = L.labelled(gr.Textbox, "train.extra", lines=2, placeholder="optim.warmup_ratio=0.1")

    fields = [widgets[f.key] for f in FIELDS]

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
    seen = gr.State(None)
    timer = gr.Timer(POLL_S)

    form_in = [base, extra, *fields]

    # --- handlers --------------------------------------------------------------------------------
    def refresh(lang_v: str, force_v: bool, base_v: dict, extra_v: str, *values: Any):
        try:
            recipe = _recipe(runs_dir, lang_v, base_v, extra_v, list(values))
        except (ConfigError, ValueError) as exc:
            return (t("train.invalid", lang_v) + f"\n\n```text\n{exc}\n```", "",
                    gr.update(interactive=False), t("train.fix_form", lang_v), [], gr.update(visible=False))
        head, report, ok, why, fix = estimate_view(recipe, force_v, lang_v)
        return head, report, gr.update(interactive=ok), why, fix, gr.update(visible=bool(fix))

    gate_out = [estimate, breakdown, start, reason, fix_state, apply_fix]
    gate_in = [lang, force, *form_in]

    def on_preset(lang_v: str, name: str):
        try:
            recipe = load_preset(name)
        except ConfigError as exc:
            warn(lang_v, str(exc))
            return [gr.skip()] * (2 + len(fields))
        return [recipe.model_dump(mode="json"), recipe.description, *form_values(recipe)]

    preset.input(on_preset, [lang, preset], [base, preset_desc, *fields]).then(
        refresh, gate_in, gate_out, show_progress="hidden")
    for comp in [*fields, extra, force]:
        comp.input(refresh, gate_in, gate_out, trigger_mode="always_last", show_progress="hidden")
    lang.change(refresh, gate_in, gate_out, show_progress="hidden")

    def on_apply_fix(extra_v: str, fix: list[str], *values: Any):
        new_values, new_extra = apply_to_form(list(values), extra_v, fix)
        return [new_extra, *new_values]

    apply_fix.click(on_apply_fix, [extra, fix_state, *fields], [extra, *fields]).then(
        refresh, gate_in, gate_out, show_progress="hidden")

    def on_show_cmd(lang_v: str, base_v: dict, extra_v: str, *values: Any):
        try:
            recipe = _recipe(runs_dir, lang_v, base_v, extra_v, list(values))
        except (ConfigError, ValueError) as exc:
            warn(lang_v, str(exc))
            return gr.skip(), gr.skip(), gr.skip()
        y, c = command_view(recipe, runs_dir)
        return y, c, gr.update(visible=True)

    show_cmd.click(on_show_cmd, [lang, *form_in], [cmd_yaml, cmd_line, cmd_group])

    def on_preview(lang_v: str, base_v: dict, extra_v: str, *values: Any):
        try:
            recipe = _recipe(runs_dir, lang_v, base_v, extra_v, list(values))
            from gptoss_webui.train.data import preview as data_preview

            examples = data_preview(recipe.train, n=1)
        except Exception as exc:  # malformed data, missing tokenizer...: a message, not a traceback
            return gr.update(visible=False), t("msg.preview_failed", lang_v, error=str(exc))
        tag = t("train.preview_trained", lang_v)
        value = [(text, tag if trained else None) for text, trained in (examples[0] if examples else [])]
        return (gr.update(value=value, color_map={tag: "green"}, visible=True),
                t("train.preview_note", lang_v))

    preview_btn.click(on_preview, [lang, *form_in], [preview, preview_msg])

    def on_upload(lang_v: str, tmp: str | None):
        if not tmp:
            return gr.skip()
        dest_dir = workspace_dir() / "data" / "uploads"
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / Path(tmp).name
        shutil.copyfile(tmp, dest)
        note(lang_v, t("msg.uploaded", lang_v, path=dest))
        return gr.update(choices=workspace_choices("data"), value=str(dest))

    upload.upload(on_upload, [lang, upload], [widgets["train.data_path"]]).then(
        refresh, gate_in, gate_out, show_progress="hidden")

    def on_start(lang_v: str, force_v: bool, base_v: dict, extra_v: str, *values: Any):
        try:
            recipe = _recipe(runs_dir, lang_v, base_v, extra_v, list(values))
            from gptoss_webui.train.launcher import launch

            run = launch(recipe, force=force_v)
        except ImportError:
            warn(lang_v, t("msg.training_missing", lang_v))
            return gr.skip(), gr.skip()
        except Exception as exc:  # ConfigError, LaunchError, FileExistsError: all worded for people
            warn(lang_v, str(exc))
            return gr.skip(), t("msg.launch_failed", lang_v, error=str(exc))
        queued = runview.run_state(run) == "queued"
        note(lang_v, t("msg.queued" if queued else "msg.launched", lang_v, name=run.name))
        return gr.update(choices=runview.run_names(runs_dir), value=run.name), ""

    poll_out = [run_pick, run_state, progress, metrics, plot, log, stop, resume, seen]

    def poll(lang_v: str, name: str | None, seen_v: Any, forced: bool = False):
        names = runview.run_names(runs_dir)
        if not name:
            sig = ("", tuple(names), lang_v)
            if sig == seen_v and not forced:
                return [gr.skip()] * len(poll_out)
            off = gr.update(interactive=False)
            empty = runview.loss_frame(runview.RunView("", "created"))
            return [gr.update(choices=names), t("train.no_run", lang_v), "", "", empty, "", off, off, sig]
        try:
            run = RunsDir(runs_dir).get(name)
        except FileNotFoundError:
            return [gr.update(choices=names, value=None), t("train.no_run", lang_v), *[gr.skip()] * 6, None]
        v = runview.view(run)
        log_text = redact(tail(run.log_path, runview.LOG_TAIL_BYTES))
        sig = (name, tuple(names), lang_v, v.state, v.n_events, len(log_text), log_text[-200:])
        if sig == seen_v and not forced:
            return [gr.skip()] * len(poll_out)
        return [gr.update(choices=names), state_md(v, lang_v), progress_html(v, lang_v),
                metrics_md(v, lang_v), runview.loss_frame(v), log_text, gr.update(interactive=v.can_stop),
                gr.update(interactive=v.can_resume), sig]

    def poll_now(lang_v: str, name: str | None, seen_v: Any):
        return poll(lang_v, name, seen_v, forced=True)

    start.click(on_start, [lang, force, *form_in], [run_pick, reason]).then(
        poll_now, [lang, run_pick, seen], poll_out)
    timer.tick(poll, [lang, run_pick, seen], poll_out, show_progress="hidden")
    run_pick.change(poll_now, [lang, run_pick, seen], poll_out, show_progress="hidden")
    refresh_runs.click(poll_now, [lang, run_pick, seen], poll_out)
    lang.change(poll_now, [lang, run_pick, seen], poll_out, show_progress="hidden")

    def on_stop(lang_v: str, name: str | None):
        if not name:
            return
        try:
            from gptoss_webui.train.launcher import stop as stop_run

            run = RunsDir(runs_dir).get(name)
        except Exception as exc:
            warn(lang_v, t("msg.stop_failed", lang_v, error=exc))
            return
        # The ranks save a checkpoint before they exit (about 35 s on gpt-oss-20b, up to the launcher's kill
        # timeout): wait in the background; the run view shows "stopping", then the stopped event.
        threading.Thread(target=stop_run, args=(run,), daemon=True, name=f"stop-{name}").start()
        note(lang_v, t("msg.stopping", lang_v, name=name))

    def on_resume(lang_v: str, force_v: bool, name: str | None):
        if not name:
            return
        try:
            from gptoss_webui.train.launcher import resume as resume_run

            run = resume_run(name, runs_dir=runs_dir, force=force_v)
            note(lang_v, t("msg.resumed", lang_v, name=run.name))
        except Exception as exc:
            warn(lang_v, t("msg.resume_failed", lang_v, error=exc))

    stop.click(on_stop, [lang, run_pick]).then(poll_now, [lang, run_pick, seen], poll_out)
    resume.click(on_resume, [lang, force, run_pick]).then(poll_now, [lang, run_pick, seen], poll_out)

    def on_reuse(lang_v: str, name: str | None):
        """Load a past run's config.yaml into the form (to repeat or tweak it)."""
        if not name:
            return [gr.skip()] * (2 + len(fields))
        try:
            recipe = Recipe.from_yaml(RunsDir(runs_dir).get(name).config_path)
        except (ConfigError, FileNotFoundError) as exc:
            warn(lang_v, str(exc))
            return [gr.skip()] * (2 + len(fields))
        recipe.train.run_name = None  # a new run: the old folder is never reused
        return [recipe.model_dump(mode="json"), recipe.description, *form_values(recipe)]

    reuse.click(on_reuse, [lang, run_pick], [base, preset_desc, *fields]).then(
        refresh, gate_in, gate_out, show_progress="hidden")

    def on_load(lang_v: str, force_v: bool, *rest: Any):
        return [*refresh(lang_v, force_v, *rest), gr.update(choices=runview.run_names(runs_dir),
                                              value=runview.pick_default(runs_dir))]

    return TrainTab(on_load=(on_load, gate_in, [*gate_out, run_pick]))
