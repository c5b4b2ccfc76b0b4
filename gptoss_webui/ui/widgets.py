"""One Gradio widget per config form field, labelled from the locale tables and bound for the switch."""

from __future__ import annotations

from typing import Any

import gradio as gr

from gptoss_webui.ui.form import FormField, workspace_choices
from gptoss_webui.ui.i18n import Localizer

# Increments of the number boxes' arrows, where 1 would be silly.
_STEPS = {"train.lr": 1e-5, "train.lora_dropout": 0.05, "train.epochs": 0.5, "train.gpu_memory": 0.5,
          "serve.gpu_util": 0.05, "serve.cpu_kv": 1, "chat.temperature": 0.1, "chat.top_p": 0.05}


def widget(L: Localizer, f: FormField, **overrides: Any) -> gr.components.Component:
    """The widget for one form field, labelled and registered for the language switch."""
    kw: dict[str, Any] = {"elem_id": "gw-" + f.key.replace(".", "-")}
    if f.widget in ("model", "data"):
        factory = gr.Dropdown
        kw.update(choices=workspace_choices(f.widget), allow_custom_value=True, scale=3)
    elif f.widget in ("dropdown", "multi"):
        factory = gr.Dropdown
        kw.update(choices=list(f.choices))
        if f.widget == "multi":
            kw.update(multiselect=True, allow_custom_value=True)
    elif f.widget == "radio":
        factory, kw["choices"] = gr.Radio, list(f.choices)
    elif f.widget == "check":
        factory = gr.Checkbox
    elif f.widget in ("int", "float"):
        factory = gr.Number
        kw.update({"precision": 0} if f.widget == "int" else {"step": _STEPS.get(f.key, 0.1)})
    else:
        factory = gr.Textbox
    return L.labelled(factory, f.key, **{**kw, **overrides})
