"""The Serve tab: engine settings bound to Recipe.serve, start/stop, serving a finished run's adapter.

The work is serve/engine.py's (the same Engine the `serve` command uses); this tab starts it in the
background (engine_ctl) and shows its state, the OpenAI base URL, the loaded adapters and the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from gptoss_webui.config import ConfigError, Recipe
from gptoss_webui.messages import text
from gptoss_webui.presets import default_recipe
from gptoss_webui.runs import RunsDir
from gptoss_webui.serve.state import EngineInfo
from gptoss_webui.ui.access import outside_paths, redact
from gptoss_webui.ui.engine_ctl import Snapshot, control_for
from gptoss_webui.ui.form import SERVE_FIELDS, form_values, serve_from_form
from gptoss_webui.ui.i18n import Localizer, t, warn
from gptoss_webui.ui.widgets import widget

POLL_S = 2.0
MODES = ("auto", "hotload", "merge")


@dataclass
class ServeTab:
    on_load: tuple[Any, ...]


def finished_runs(runs_dir: str) -> list[str]:
    """Runs whose adapter is written (what can be served)."""
    return [r.name for r in RunsDir(runs_dir).list() if (r.adapter_dir / "adapter_config.json").is_file()]


def engine_md(snap: Snapshot, lang: str) -> str:
    """State line, then what the current (or last) engine task said, then its error if any."""
    info, task = snap.info, snap.task
    head = f"**{t('engine.' + snap.state, lang)}**"
    if snap.state in ("starting", "running") or (snap.state == "busy" and info.port):
        head += " · " + t("serve.serving", lang, model=info.served_name or info.model_spec or "?",
                          url=info.base_url)
    paragraphs = [head]
    if info.lora_note and snap.state == "running":
        paragraphs.append(t("serve.lora_note", lang, note=info.lora_note))
    # After a UI restart there is no task: show the engine's own remarks (a task's messages include them).
    said = task.messages[-6:] if task else info.notes[-3:]
    if said:
        paragraphs.append("\n".join(f"- {text(m, lang)}" for m in said))
    if task and task.error:
        paragraphs.append(t("serve.task_failed", lang, error=text(task.error, lang)))
    elif snap.state == "crashed" and info.error:
        paragraphs.append(t("serve.crashed_with", lang, error=info.error))
    return "\n\n".join(paragraphs)


def served_model(info: EngineInfo) -> str:
    """What the Model field shows while an engine is up: the merged folder it loads for a merged run, else the
    base as it was given (its hot-loaded adapters are listed under Served adapters)."""
    return info.model if info.merged_from else (info.model_spec or info.model)


def adapters_md(snap: Snapshot, lang: str) -> str:
    info = snap.info
    if snap.state != "running":
        return t("serve.no_adapters", lang)
    rows = [f"- `{name}` ({t('serve.hotloaded', lang)}) — {path}" for name, path in info.adapters.items()]
    rows += [f"- `{name}` ({t('serve.merged', lang)}) — {path}" for name, path in info.merged_from.items()]
    return "\n".join(rows) if rows else t("serve.no_adapters", lang)


def build(L: Localizer, lang: gr.Radio, runs_dir: str) -> ServeTab:
    control = control_for()
    recipe0 = default_recipe()
    base = gr.State(recipe0.serve.model_dump(mode="json"))

    L.markdown("serve.engine_md")
    values0 = form_values(recipe0, SERVE_FIELDS)
    fields: list[Any] = []
    with gr.Row():
        for f, v in list(zip(SERVE_FIELDS, values0, strict=True))[:3]:
            fields.append(widget(L, f, value=v))
    with gr.Row():
        for f, v in list(zip(SERVE_FIELDS, values0, strict=True))[3:]:
            fields.append(widget(L, f, value=v))
    with gr.Row():
        start = L.button("serve.start", variant="primary", elem_id="gw-engine-start")
        stop = L.button("serve.stop", variant="stop", elem_id="gw-engine-stop")
    state = gr.Markdown(elem_id="gw-engine-state")
    base_url = L.labelled(gr.Textbox, "serve.base_url", interactive=False, elem_id="gw-base-url",
                          buttons=["copy"])

    L.markdown("serve.run_md")
    with gr.Row():
        run = L.labelled(gr.Dropdown, "serve.run", choices=finished_runs(runs_dir), value=None, scale=3,
                         elem_id="gw-serve-run")
        mode = L.labelled(gr.Radio, "serve.mode", choices=list(MODES), value="auto", scale=2,
                          elem_id="gw-serve-mode")
        serve_run = L.button("serve.serve_run", variant="primary", scale=1,
                                     elem_id="gw-serve-run-btn")
    L.markdown("serve.adapters_md")
    adapters = gr.Markdown(elem_id="gw-adapters")
    with gr.Row():
        unload_pick = L.labelled(gr.Dropdown, "serve.unload_pick", choices=[], scale=3)
        unload = L.button("serve.unload", scale=1)
    with L.accordion("serve.log", open=False):
        log = gr.Textbox(lines=12, max_lines=12, interactive=False, show_label=False, autoscroll=True,
                         elem_id="gw-engine-log")
    seen = gr.State(None)
    timer = gr.Timer(POLL_S)

    # --- handlers --------------------------------------------------------------------------------
    poll_out = [state, base_url, adapters, unload_pick, log, start, stop, serve_run, run, fields[0], seen]

    def poll(lang_v: str, seen_v: Any, forced: bool = False):
        try:
            snap = control.snapshot()
        except Exception as exc:  # e.g. the serving package is missing: say so, keep the page alive
            return [t("serve.unavailable", lang_v, error=exc), *[gr.skip()] * (len(poll_out) - 1)]
        runs = finished_runs(runs_dir)
        info, task = snap.info, snap.task
        served = served_model(info) if info.live and info.pid else None
        sig = (lang_v, snap.state, info.to_json(), task and (len(task.messages), task.error, task.done),
               snap.log_tail[-300:], tuple(runs), served)
        if sig == seen_v and not forced:
            return [gr.skip()] * len(poll_out)
        busy = snap.state in ("busy", "starting")
        live = snap.state == "running"
        url = info.base_url if live or snap.state == "starting" else ""
        # The Model field follows the engine when what it serves changes, and is the user's again otherwise.
        model = served if served and (forced or not seen_v or seen_v[-1] != served) else gr.skip()
        return [redact(engine_md(snap, lang_v)), url, adapters_md(snap, lang_v),
                gr.update(choices=list(info.adapters) if live else []), redact(snap.log_tail),
                gr.update(interactive=not busy and not live), gr.update(interactive=snap.state != "stopped"),
                gr.update(interactive=not busy), gr.update(choices=runs), model, sig]

    def poll_now(lang_v: str, seen_v: Any):
        return poll(lang_v, seen_v, forced=True)

    def config(lang_v: str, base_v: dict, values: tuple):
        try:
            cfg = serve_from_form(base_v, SERVE_FIELDS, list(values))
        except ConfigError as exc:
            warn(lang_v, text(exc, lang_v))
            return None
        if refused := outside_paths(Recipe(serve=cfg), runs_dir):
            warn(lang_v, t("msg.path_outside", lang_v, what=refused[0]))
            return None
        return cfg

    def on_start(lang_v: str, base_v: dict, *values: Any):
        cfg = config(lang_v, base_v, values)
        if cfg is not None:
            _act(lang_v, lambda: control.start(cfg))

    def on_stop(lang_v: str):
        _act(lang_v, control.stop)

    def on_pick_run(lang_v: str, name: str | None, *values: Any):
        """Take the run's serve settings (and its base model) into the form; the port stays this host's."""
        if not name:
            return [gr.skip()] * (1 + len(values))
        try:
            recipe = Recipe.from_yaml(RunsDir(runs_dir).get(name).config_path)
        except (ConfigError, FileNotFoundError) as exc:
            warn(lang_v, text(exc, lang_v))
            return [gr.skip()] * (1 + len(values))
        port = values[[f.path for f in SERVE_FIELDS].index("serve.port")] or recipe.serve.port
        serve = recipe.serve.model_copy(update={"model": recipe.train.model, "port": int(port)})
        return [serve.model_dump(mode="json"), *form_values(Recipe(serve=serve), SERVE_FIELDS)]

    def on_serve_run(lang_v: str, base_v: dict, name: str | None, mode_v: str, *values: Any):
        if not name:
            warn(lang_v, t("serve.pick_run", lang_v))
            return
        cfg = config(lang_v, base_v, values)
        if cfg is None:
            return
        try:
            the_run = RunsDir(runs_dir).get(name)
            recipe = Recipe.from_yaml(the_run.config_path)
        except (ConfigError, FileNotFoundError) as exc:
            warn(lang_v, text(exc, lang_v))
            return
        cfg = cfg.model_copy(update={"model": recipe.train.model})  # the adapter's own base
        _act(lang_v, lambda: control.serve_adapter(cfg, name, str(the_run.adapter_dir), mode_v))

    def on_unload(lang_v: str, name: str | None):
        if name:
            _act(lang_v, lambda: control.unload(name))

    start.click(on_start, [lang, base, *fields]).then(poll_now, [lang, seen], poll_out)
    stop.click(on_stop, [lang]).then(poll_now, [lang, seen], poll_out)
    run.input(on_pick_run, [lang, run, *fields], [base, *fields])
    serve_run.click(on_serve_run, [lang, base, run, mode, *fields]).then(poll_now, [lang, seen], poll_out)
    unload.click(on_unload, [lang, unload_pick]).then(poll_now, [lang, seen], poll_out)
    timer.tick(poll, [lang, seen], poll_out, show_progress="hidden")
    lang.change(poll_now, [lang, seen], poll_out, show_progress="hidden")
    return ServeTab(on_load=(poll_now, [lang, seen], poll_out))


def _act(lang: str, action: Any) -> None:
    """Start a background engine task; a second one while the first runs is refused politely."""
    try:
        action()
    except RuntimeError:
        warn(lang, t("serve.busy", lang))
