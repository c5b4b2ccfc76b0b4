"""The Train tab: a form bound to Recipe.train, the memory gate, launch/stop/resume, and live progress.

Every action calls the same function the CLI calls (train.launcher, train.memory, train.data.preview);
progress is read from the run folder on a gr.Timer, so closing the page never stops or loses a run.
The widgets are placed in train_layout.py; here are what they show (the views), the handlers, and `wire`, which
binds one to the other. What the pipeline says (estimate, queue place, data, launch errors) arrives as
gptoss_webui.messages and is shown in the page's language.
"""

from __future__ import annotations

import functools
import html
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from gptoss_webui.config import ConfigError, Recipe
from gptoss_webui.logs import tail
from gptoss_webui.messages import text
from gptoss_webui.paths import workspace_dir
from gptoss_webui.presets import load_preset
from gptoss_webui.runs import RunsDir
from gptoss_webui.ui import runview
from gptoss_webui.ui.access import outside_paths, redact
from gptoss_webui.ui.form import FIELDS, apply_to_form, form_values, recipe_from_form, workspace_choices
from gptoss_webui.ui.i18n import Localizer, note, t, warn
from gptoss_webui.ui.train_layout import TrainWidgets, layout


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
        return t("train.estimate_failed", lang, error=text(exc, lang)), "", True, "", []
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
    fix = est.fix
    overrides = list(fix.overrides) if fix and not est.fits else []
    if overrides:
        head += "\n\n" + t("train.fix", lang, change=fix.change.render(lang), overrides=" ".join(overrides),
                            margin=f"{fix.margin_gib:.1f}")
    elif est.remedy:  # nothing tried fits
        head += "\n\n" + est.remedy.render(lang)
    if est.longest and not est.fits:
        head += "  \n" + est.longest.render(lang)
    report = est.report(lang)
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
        text += "  \n" + t("train.data_stats", lang, summary=v.data.render(lang))
    return text


def state_md(v: runview.RunView, lang: str) -> str:
    text = f"**{v.name}** · {t('state.' + v.state, lang)}"
    if v.final and v.final.get("type") == "done":
        text += " · " + t("train.adapter_at", lang, path=v.final.get("adapter_path", ""))
    if v.error and v.state == "failed":
        text += "\n\n" + t("train.failed_with", lang, error=redact(v.error))
    if v.queue_place:
        text += " · " + t("train.queued", lang, place=v.queue_place.render(lang))
    return text


# --- handlers: each takes the runs folder first (bound in `wire`), then the widgets' values -----------------

def refresh(runs_dir: str, lang_v: str, force_v: bool, base_v: dict, extra_v: str, *values: Any):
    """The memory gate: (estimate, breakdown, Start, reason, fix overrides, Apply-fix button)."""
    try:
        recipe = _recipe(runs_dir, lang_v, base_v, extra_v, list(values))
    except (ConfigError, ValueError) as exc:
        return (t("train.invalid", lang_v) + f"\n\n```text\n{text(exc, lang_v)}\n```", "",
                gr.update(interactive=False), t("train.fix_form", lang_v), [], gr.update(visible=False))
    head, report, ok, why, fix = estimate_view(recipe, force_v, lang_v)
    return head, report, gr.update(interactive=ok), why, fix, gr.update(visible=bool(fix))


def _to_form(recipe: Recipe) -> list[Any]:
    """(base, description, every field): what loading a preset or a past run puts in the form."""
    return [recipe.model_dump(mode="json"), recipe.description, *form_values(recipe)]


NO_FORM = [gr.skip()] * (2 + len(FIELDS))


def on_preset(lang_v: str, name: str):
    try:
        return _to_form(load_preset(name))
    except ConfigError as exc:
        warn(lang_v, text(exc, lang_v))
        return NO_FORM


def on_apply_fix(extra_v: str, fix: list[str], *values: Any):
    new_values, new_extra = apply_to_form(list(values), extra_v, fix)
    return [new_extra, *new_values]


def on_show_cmd(runs_dir: str, lang_v: str, base_v: dict, extra_v: str, *values: Any):
    try:
        recipe = _recipe(runs_dir, lang_v, base_v, extra_v, list(values))
    except (ConfigError, ValueError) as exc:
        warn(lang_v, text(exc, lang_v))
        return gr.skip(), gr.skip(), gr.skip()
    y, c = command_view(recipe, runs_dir)
    return y, c, gr.update(visible=True)


def on_preview(runs_dir: str, lang_v: str, base_v: dict, extra_v: str, *values: Any):
    try:
        recipe = _recipe(runs_dir, lang_v, base_v, extra_v, list(values))
        from gptoss_webui.train.data import preview as data_preview

        examples = data_preview(recipe.train, n=1)
    except Exception as exc:  # malformed data, missing tokenizer...: a message, not a traceback
        return gr.update(visible=False), t("msg.preview_failed", lang_v, error=text(exc, lang_v))
    tag = t("train.preview_trained", lang_v)
    value = [(segment, tag if trained else None) for segment, trained in (examples[0] if examples else [])]
    return gr.update(value=value, color_map={tag: "green"}, visible=True), t("train.preview_note", lang_v)


def on_upload(lang_v: str, tmp: str | None):
    if not tmp:
        return gr.skip()
    dest_dir = workspace_dir() / "data" / "uploads"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / Path(tmp).name
    shutil.copyfile(tmp, dest)
    note(lang_v, t("msg.uploaded", lang_v, path=dest))
    return gr.update(choices=workspace_choices("data"), value=str(dest))


def on_start(runs_dir: str, lang_v: str, force_v: bool, base_v: dict, extra_v: str, *values: Any):
    try:
        recipe = _recipe(runs_dir, lang_v, base_v, extra_v, list(values))
        from gptoss_webui.train.launcher import launch

        run = launch(recipe, force=force_v)
    except ImportError:
        warn(lang_v, t("msg.training_missing", lang_v))
        return gr.skip(), gr.skip()
    except Exception as exc:  # ConfigError, LaunchError, FileExistsError: all worded for people
        warn(lang_v, text(exc, lang_v))
        return gr.skip(), t("msg.launch_failed", lang_v, error=text(exc, lang_v))
    queued = runview.run_state(run) == "queued"
    note(lang_v, t("msg.queued" if queued else "msg.launched", lang_v, name=run.name))
    return gr.update(choices=runview.run_names(runs_dir), value=run.name), ""


POLL_OUTPUTS = 9  # run_pick, run_state, progress, metrics, plot, log, stop, resume, seen


def poll(runs_dir: str, lang_v: str, name: str | None, seen_v: Any, forced: bool = False):
    """The picked run as the folder has it now; skipped when nothing changed since `seen_v`."""
    names = runview.run_names(runs_dir)
    if not name:
        sig = ("", tuple(names), lang_v)
        if sig == seen_v and not forced:
            return [gr.skip()] * POLL_OUTPUTS
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
        return [gr.skip()] * POLL_OUTPUTS
    return [gr.update(choices=names), state_md(v, lang_v), progress_html(v, lang_v), metrics_md(v, lang_v),
            runview.loss_frame(v), log_text, gr.update(interactive=v.can_stop), gr.update(interactive=v.can_resume),
            sig]


def poll_now(runs_dir: str, lang_v: str, name: str | None, seen_v: Any):
    return poll(runs_dir, lang_v, name, seen_v, forced=True)


def on_stop(runs_dir: str, lang_v: str, name: str | None) -> None:
    if not name:
        return
    try:
        from gptoss_webui.train.launcher import stop as stop_run

        run = RunsDir(runs_dir).get(name)
    except Exception as exc:
        warn(lang_v, t("msg.stop_failed", lang_v, error=text(exc, lang_v)))
        return
    # The ranks save a checkpoint before they exit (about 35 s on gpt-oss-20b, up to the launcher's kill
    # timeout): wait in the background; the run view shows "stopping", then the stopped event.
    threading.Thread(target=stop_run, args=(run,), daemon=True, name=f"stop-{name}").start()
    note(lang_v, t("msg.stopping", lang_v, name=name))


def on_resume(runs_dir: str, lang_v: str, force_v: bool, name: str | None) -> None:
    if not name:
        return
    try:
        from gptoss_webui.train.launcher import resume as resume_run

        run = resume_run(name, runs_dir=runs_dir, force=force_v)
        note(lang_v, t("msg.resumed", lang_v, name=run.name))
    except Exception as exc:
        warn(lang_v, t("msg.resume_failed", lang_v, error=text(exc, lang_v)))


def on_reuse(runs_dir: str, lang_v: str, name: str | None):
    """Load a past run's config.yaml into the form (to repeat or tweak it)."""
    if not name:
        return NO_FORM
    try:
        recipe = Recipe.from_yaml(RunsDir(runs_dir).get(name).config_path)
    except (ConfigError, FileNotFoundError) as exc:
        warn(lang_v, text(exc, lang_v))
        return NO_FORM
    recipe.train.run_name = None  # a new run: the old folder is never reused
    return _to_form(recipe)


def on_load(runs_dir: str, lang_v: str, force_v: bool, *rest: Any):
    return [*refresh(runs_dir, lang_v, force_v, *rest),
            gr.update(choices=runview.run_names(runs_dir), value=runview.pick_default(runs_dir))]


# --- the tab: layout (train_layout), then the wiring ----------------------------------------------

# The Log box holds the end of train.log; show its last line. Gradio 6.31's Textbox autoscroll scrolls only once,
# not when the server sends a new value, so the box stayed at the top of the tail: mid-run lines.
LOG_TO_END = ("() => { const box = document.querySelector('#gw-log textarea'); "
              "if (box) box.scrollTop = box.scrollHeight; }")

def wire(w: TrainWidgets, lang: gr.Radio, runs_dir: str) -> TrainTab:
    """Bind the widgets' events to the handlers above."""
    at = functools.partial  # every handler that reads or writes runs gets this app's runs folder first
    form_in = [w.base, w.extra, *w.fields]
    form_out = [w.base, w.preset_desc, *w.fields]
    gate_in, gate_out = [lang, w.force, *form_in], [w.estimate, w.breakdown, w.start, w.reason, w.fix_state,
                                                    w.apply_fix]
    gate = at(refresh, runs_dir)
    poll_in = [lang, w.run_pick, w.seen]
    poll_out = [w.run_pick, w.run_state, w.progress, w.metrics, w.plot, w.log, w.stop, w.resume, w.seen]
    now = at(poll_now, runs_dir)
    hidden = {"show_progress": "hidden"}

    w.preset.input(on_preset, [lang, w.preset], form_out).then(gate, gate_in, gate_out, **hidden)
    for comp in [*w.fields, w.extra, w.force]:
        comp.input(gate, gate_in, gate_out, trigger_mode="always_last", **hidden)
    lang.change(gate, gate_in, gate_out, **hidden)
    w.apply_fix.click(on_apply_fix, [w.extra, w.fix_state, *w.fields], [w.extra, *w.fields]).then(
        gate, gate_in, gate_out, **hidden)
    w.show_cmd.click(at(on_show_cmd, runs_dir), [lang, *form_in], [w.cmd_yaml, w.cmd_line, w.cmd_group])
    w.preview_btn.click(at(on_preview, runs_dir), [lang, *form_in], [w.preview, w.preview_msg])
    w.upload.upload(on_upload, [lang, w.upload], [w.data_path]).then(gate, gate_in, gate_out, **hidden)

    w.start.click(at(on_start, runs_dir), [lang, w.force, *form_in], [w.run_pick, w.reason]).then(
        now, poll_in, poll_out)
    w.timer.tick(at(poll, runs_dir), poll_in, poll_out, **hidden)
    w.run_pick.change(now, poll_in, poll_out, **hidden)
    w.refresh_runs.click(now, poll_in, poll_out)
    lang.change(now, poll_in, poll_out, **hidden)
    w.stop.click(at(on_stop, runs_dir), [lang, w.run_pick]).then(now, poll_in, poll_out)
    w.resume.click(at(on_resume, runs_dir), [lang, w.force, w.run_pick]).then(now, poll_in, poll_out)
    w.reuse.click(at(on_reuse, runs_dir), [lang, w.run_pick], form_out).then(gate, gate_in, gate_out, **hidden)
    w.log.change(None, js=LOG_TO_END)
    assert len(poll_out) == POLL_OUTPUTS
    return TrainTab(on_load=(at(on_load, runs_dir), gate_in, [*gate_out, w.run_pick]))


def build(L: Localizer, lang: gr.Radio, runs_dir: str) -> TrainTab:
    return wire(layout(L, runs_dir), lang, runs_dir)
