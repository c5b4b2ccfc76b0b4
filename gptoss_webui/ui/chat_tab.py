"""The Chat tab: streaming chat with the served base model or an adapter, and a side-by-side compare.

serve/chat.py does the talking (OpenAI client, harmony reasoning apart from the answer); this tab keeps
the conversation (plain role/content turns, as sent to the server) and renders it, reasoning collapsed.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from gptoss_webui import messages
from gptoss_webui.config import ConfigError
from gptoss_webui.presets import default_recipe
from gptoss_webui.ui.engine_ctl import control_for
from gptoss_webui.ui.form import CHAT_FIELDS, form_values, serve_from_form
from gptoss_webui.ui.i18n import Localizer, failure, t, warn
from gptoss_webui.ui.widgets import widget

POLL_S = 3.0


def render(turns: list[dict[str, str]], lang: str, pending: bool = False) -> list[dict[str, Any]]:
    """Conversation turns -> Chatbot messages; an assistant turn's reasoning becomes a collapsed block."""
    out: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant" and turn.get("reasoning"):
            out.append({"role": "assistant", "content": turn["reasoning"],
                        "metadata": {"title": t("chat.reasoning", lang), "status": "done"}})
        content = turn.get("content") or ""
        if turn["role"] == "assistant" and not content:
            last = i == len(turns) - 1
            content = "…" if (pending and last) else t("chat.no_answer", lang)
        out.append({"role": turn["role"], "content": content})
    return out


def compare_choices(names: list[str], a: str | None, b: str | None) -> tuple[list[str], str | None,
                                                                          list[str], str | None]:
    """Compare's two sides: (left choices, left, right choices, right). Nothing when the engine serves one model
    (a merged run); the right side never offers the left's model. Defaults: the base left, the last adapter right."""
    if len(names) < 2:
        return [], None, [], None
    a = a if a in names else names[0]
    right = [n for n in names if n != a]
    return names, a, right, b if b in right else right[-1]


def build(L: Localizer, lang: gr.Radio) -> None:
    control = control_for()
    recipe0 = default_recipe()
    with gr.Row():
        model = L.labelled(gr.Dropdown, "chat.model", choices=[], scale=3, elem_id="gw-chat-model")
        status = gr.Markdown(elem_id="gw-chat-status")
    with gr.Row():
        params = [widget(L, f, value=v) for f, v in zip(CHAT_FIELDS, form_values(recipe0, CHAT_FIELDS),
                                                          strict=True)]
    turns = gr.State([])
    chatbot = L.labelled(gr.Chatbot, "chat.chatbot", height=380, elem_id="gw-chatbot")
    with gr.Row():
        prompt = L.labelled(gr.Textbox, "chat.prompt", scale=5, elem_id="gw-chat-input", lines=2)
        with gr.Column(scale=1, min_width=120):
            send = L.button("chat.send", variant="primary", elem_id="gw-chat-send")
            stop = L.button("chat.stop", variant="stop", elem_id="gw-chat-stop")
            clear = L.button("chat.clear", elem_id="gw-chat-clear")

    L.markdown("chat.compare_md")
    with gr.Row():
        model_a = L.labelled(gr.Dropdown, "chat.model_a", choices=[], elem_id="gw-cmp-model-a")
        model_b = L.labelled(gr.Dropdown, "chat.model_b", choices=[], elem_id="gw-cmp-model-b")
    with gr.Row():
        cmp_prompt = L.labelled(gr.Textbox, "chat.compare_prompt", scale=5, elem_id="gw-cmp-input")
        compare = L.button("chat.compare", variant="primary", scale=1, elem_id="gw-cmp-btn")
    with gr.Row():
        out_a = gr.Chatbot(height=300, show_label=False, elem_id="gw-cmp-a")
        out_b = gr.Chatbot(height=300, show_label=False, elem_id="gw-cmp-b")
    timer = gr.Timer(POLL_S)

    # --- handlers --------------------------------------------------------------------------------
    def engine_client(lang_v: str):
        from gptoss_webui.serve.chat import ChatClient

        snap = control.snapshot()
        if snap.state != "running":
            raise failure(lang_v, t("chat.no_engine", lang_v, state=t("engine." + snap.state, lang_v)))
        info = snap.info
        return ChatClient(info.base_url, control.engine.api_key, info.model_type)

    def sampling(lang_v: str, values: tuple):
        from gptoss_webui.serve.chat import SamplingParams

        try:
            return SamplingParams.from_config(serve_from_form(recipe0.serve.model_dump(mode="json"),
                                                              CHAT_FIELDS, list(values)))
        except ConfigError as exc:
            raise failure(lang_v, messages.text(exc, lang_v)) from None

    def on_send(lang_v: str, model_v: str | None, turns_v: list, text: str, *values: Any):
        from gptoss_webui.serve.chat import ChatError

        if not (text or "").strip():
            yield gr.skip(), gr.skip(), gr.skip()
            return
        client, params = engine_client(lang_v), sampling(lang_v, values)
        if not model_v:
            raise failure(lang_v, t("chat.pick_model", lang_v))
        history = [*turns_v, {"role": "user", "content": text.strip()}]
        yield render([*history, {"role": "assistant", "content": ""}], lang_v, pending=True), history, ""
        reply = None
        try:
            for reply in client.stream(history, model_v, params):
                turn = {"role": "assistant", "content": reply.content, "reasoning": reply.reasoning}
                yield render([*history, turn], lang_v, pending=not reply.done), history, gr.skip()
        except ChatError as exc:  # shown in the conversation, where it happened; not sent back to the model
            said = messages.text(exc, lang_v)
            warn(lang_v, said)
            yield render([*history, {"role": "assistant", "content": f"❌ {said}"}], lang_v), history, gr.skip()
            return
        final = [*history, {"role": "assistant", "content": reply.content if reply else "",
                            "reasoning": reply.reasoning if reply else ""}]
        yield render(final, lang_v), final, gr.skip()

    send_ev = send.click(on_send, [lang, model, turns, prompt, *params], [chatbot, turns, prompt])
    submit_ev = prompt.submit(on_send, [lang, model, turns, prompt, *params], [chatbot, turns, prompt])
    stop.click(None, cancels=[send_ev, submit_ev])
    clear.click(lambda: ([], []), None, [chatbot, turns])

    def on_compare(lang_v: str, a: str | None, b: str | None, text: str, *values: Any):
        if not (text or "").strip():
            yield gr.skip(), gr.skip()
            return
        if not a or not b:
            raise failure(lang_v, t("chat.pick_model", lang_v))
        if a == b:
            raise failure(lang_v, t("chat.same_model", lang_v, name=a))
        client, params = engine_client(lang_v), sampling(lang_v, values)
        user = {"role": "user", "content": text.strip()}
        for replies in client.compare(text.strip(), [a, b], params):
            shown = []
            for name in (a, b):
                r = replies[name]
                content = f"❌ {messages.text(r.error, lang_v)}" if r.error else r.content
                turn = {"role": "assistant", "content": content, "reasoning": r.reasoning}
                shown.append(render([user, turn], lang_v, pending=not r.done))
            yield shown[0], shown[1]

    compare.click(on_compare, [lang, model_a, model_b, cmp_prompt, *params], [out_a, out_b])

    def poll(lang_v: str, current: str | None, a: str | None, b: str | None, seen_v: Any):
        """Follow the engine: which names it serves (base or merged model first, then adapters)."""
        try:
            snap = control.snapshot()
        except Exception:
            return [gr.skip()] * 5
        names = snap.info.model_names if snap.state == "running" else []
        sig = (lang_v, snap.state, tuple(names), snap.info.base_url)
        if sig == seen_v:
            return [gr.skip()] * 5
        text = (t("chat.engine_at", lang_v, url=snap.info.base_url) if names
                else "_" + t("chat.no_engine", lang_v, state=t("engine." + snap.state, lang_v)) + "_")
        if len(names) == 1:  # a merged run (or a base alone) is one model: nothing to compare it with
            text += "  \n_" + t("chat.compare_one", lang_v, name=names[0]) + "_"
        left, a, right, b = compare_choices(names, a, b)
        chosen = current if current in names else (names[-1] if names else None)
        return [gr.update(choices=names, value=chosen), text, gr.update(choices=left, value=a),
                gr.update(choices=right, value=b), sig]

    def on_pick_left(seen_v: Any, a: str | None, b: str | None):
        names = list(seen_v[2]) if seen_v else []  # poll's signature holds the served names third
        _left, _a, right, b = compare_choices(names, a, b)
        return gr.update(choices=right, value=b)

    seen = gr.State(None)
    model_a.input(on_pick_left, [seen, model_a, model_b], [model_b])
    poll_in, poll_out = [lang, model, model_a, model_b, seen], [model, status, model_a, model_b, seen]
    timer.tick(poll, poll_in, poll_out, show_progress="hidden")
    lang.change(lambda *a: poll(*a[:-1], None), poll_in, poll_out, show_progress="hidden")
