"""The page: header (hardware, language), the Train / Serve / Chat tabs, and what happens on load.

The page holds no state of its own: on every load it reattaches to whatever runs/ and the engine state
file say (a running training run, a running engine), so reloads and UI restarts lose nothing.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from gptoss_webui import hardware
from gptoss_webui.ui import chat_tab, serve_tab, train_tab
from gptoss_webui.ui.i18n import LANG_CHOICES, Localizer, detect_lang, t

CSS = """
.gw-progress { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.gw-bar { height: 100%; background: var(--color-accent); transition: width .5s; }
.gw-progress-label { font-size: var(--text-sm); margin-top: 4px; }
.gw-muted { opacity: .8; font-size: var(--text-sm); }
#gw-header { align-items: center; }
"""


def build_page(runs_dir: str = "runs", lang: str | None = None):
    """The Blocks app; `lang` forces a language (else the browser's Accept-Language decides)."""
    runs_dir = str(Path(runs_dir).resolve())
    L = Localizer(lang or "en")
    with gr.Blocks(title="gpt-oss WebUI") as demo:
        with gr.Row(elem_id="gw-header"):
            L.markdown("app.title_md")
            hw = gr.Markdown(elem_id="gw-hardware")
            lang_pick = gr.Radio(LANG_CHOICES, value=L.lang, show_label=False, elem_id="gw-lang",
                                 container=False)
        with gr.Tabs():
            with L.bind(gr.Tab(L("tab.train"), id="train", elem_id="gw-tab-train"), label="tab.train"):
                train = train_tab.build(L, lang_pick, runs_dir)
            with L.bind(gr.Tab(L("tab.serve"), id="serve", elem_id="gw-tab-serve"), label="tab.serve"):
                serve = serve_tab.build(L, lang_pick, runs_dir)
            with L.bind(gr.Tab(L("tab.chat"), id="chat", elem_id="gw-tab-chat"), label="tab.chat"):
                chat_tab.build(L, lang_pick)

        def hardware_md(lang_v: str) -> str:
            try:
                text = hardware.summary()
            except Exception:  # NVML hiccups must not break the page
                text = "?"
            return t("app.hardware", lang_v, hw=text)

        components = L.components

        def relabel(lang_v: str):
            return [hardware_md(lang_v), *L.updates(lang_v)]

        lang_pick.change(relabel, lang_pick, [hw, *components], show_progress="hidden")

        def pick_lang(request: gr.Request) -> str:
            if lang:
                return lang
            return detect_lang(request.headers.get("accept-language") if request else None)

        # First the language (its .change relabels everything), then reattach to runs and the engine.
        demo.load(pick_lang, None, lang_pick).then(hardware_md, lang_pick, hw).then(
            *train.on_load).then(*serve.on_load)
    # The handlers are the page's plumbing, not an API: keep them out of the API page and out of the
    # endpoint list gradio embeds even in its login page.
    for fn in demo.fns.values():
        fn.api_visibility = "private"
    return demo
