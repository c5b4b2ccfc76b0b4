"""English / 简体中文 for every label, help text and message of the UI.

Strings live in locales/<lang>.yaml as flat `key: text` maps (the pipeline's messages, which the UI shows through
`gptoss_webui.messages.text`, in gptoss_webui/locales). Components are built with the default
language and registered with `Localizer.bind`; switching the language sends one `gr.update` per
registered component, so the switch is per browser session and needs no page reload.
A key `K` is a label; `K.info` (if present) is the help text shown under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from gptoss_webui.messages import LANGS, Catalog

LANG_CHOICES = [("English", "en"), ("简体中文", "zh")]
UI = Catalog(Path(__file__).parent / "locales")

C = TypeVar("C")


def table(lang: str) -> dict[str, str]:
    return UI.table(lang)


def t(key: str, lang: str = "en", **fmt: Any) -> str:
    """The text for `key` in `lang` (English, then the key itself, as fallbacks), formatted with `fmt`."""
    return UI.text(key, lang, **fmt)


def has(key: str) -> bool:
    return key in table("en")


def detect_lang(accept_language: str | None) -> str:
    """Pick en/zh from an Accept-Language header, honouring q-values (zh-CN;q=0.9 ...)."""
    best, best_q = "en", -1.0
    for part in (accept_language or "").split(","):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        code = tag.strip().lower().split("-")[0]
        if code in LANGS and q > best_q:
            best, best_q = code, q
    return best


# --- toasts with localized titles (gradio's default titles are English) -------------------------

def warn(lang: str, message: str) -> None:
    import gradio as gr

    gr.Warning(_safe(message), title=t("msg.warning", lang))


def note(lang: str, message: str) -> None:
    import gradio as gr

    gr.Info(_safe(message), title=t("msg.info", lang))


def failure(lang: str, message: str) -> Exception:
    """An error to raise from a handler: a modal with the message, no traceback anywhere."""
    import gradio as gr

    return gr.Error(_safe(message), title=t("msg.error", lang), print_exception=False)


def _safe(message: str) -> str:
    """Toasts render HTML: show messages (paths with <run-name>, log excerpts) as text."""
    import html

    from gptoss_webui.ui.access import redact

    return html.escape(redact(str(message)))


class Localizer:
    """Remembers which component attribute shows which key, to re-render them all in another language."""

    def __init__(self, lang: str = "en") -> None:
        self.lang = lang if lang in LANGS else "en"
        self._bound: list[tuple[Any, dict[str, str]]] = []

    def __call__(self, key: str, **fmt: Any) -> str:
        return t(key, self.lang, **fmt)

    def bind(self, component: C, **attrs: str) -> C:
        """Register `component`, whose attributes (label=, info=, value=, placeholder=...) show these keys."""
        self._bound.append((component, attrs))
        return component

    def labelled(self, factory: Any, key: str, **kwargs: Any) -> Any:
        """Build `factory(label=K, info=K.info, ...)` in the default language and register it."""
        attrs = {"label": key}
        kwargs.setdefault("label", self(key))
        if has(f"{key}.info"):
            attrs["info"] = f"{key}.info"
            kwargs.setdefault("info", self(f"{key}.info"))
        return self.bind(factory(**kwargs), **attrs)

    # Shorthands for widgets whose text is their value (buttons, headings) or whose label is a title.
    def button(self, key: str, **kwargs: Any) -> Any:
        import gradio as gr

        return self.bind(gr.Button(self(key), **kwargs), value=key)

    def markdown(self, key: str, **kwargs: Any) -> Any:
        import gradio as gr

        return self.bind(gr.Markdown(self(key), **kwargs), value=key)

    def accordion(self, key: str, **kwargs: Any) -> Any:
        import gradio as gr

        return self.bind(gr.Accordion(self(key), **kwargs), label=key)

    @property
    def components(self) -> list[Any]:
        return [c for c, _ in self._bound]

    def updates(self, lang: str) -> list[dict[str, Any]]:
        import gradio as gr

        return [gr.update(**{attr: t(key, lang) for attr, key in attrs.items()}) for _, attrs in self._bound]
