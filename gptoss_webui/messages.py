"""What the pipeline says to people, as a key and its parameters, worded per language from locale tables.

The pipeline (memory estimate, queue, data, launch checks) decides and words things with `say(key, **params)`;
`str(message)` is the English text the CLI and the logs print, and the UI shows the same message in the page's
language with `message.render(lang)`. The words live in gptoss_webui/locales/<lang>.yaml (the UI's own labels in
gptoss_webui/ui/locales, read by the same `Catalog`). Templates may carry format specs (`{gib:.1f}`), so the numbers
read the same in every language; a parameter that is itself a Message is rendered in the same language first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import yaml

LANGS = ("en", "zh")


class Catalog:
    """Flat `key: text` tables, one YAML file per language in `folder`; English, then the key, as fallbacks."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._tables: dict[str, dict[str, str]] = {}

    def table(self, lang: str) -> dict[str, str]:
        if lang not in self._tables:
            data = yaml.safe_load((self.folder / f"{lang}.yaml").read_text(encoding="utf-8")) or {}
            self._tables[lang] = {str(k): str(v) for k, v in data.items()}
        return self._tables[lang]

    def text(self, key: str, lang: str = "en", **fmt: Any) -> str:
        text = self.table(lang if lang in LANGS else "en").get(key) or self.table("en").get(key) or key
        return text.format(**fmt) if fmt else text


MESSAGES = Catalog(Path(__file__).parent / "locales")


@dataclass(frozen=True)
class Message:
    key: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def render(self, lang: str = "en") -> str:
        # Nested messages in the same language; other values keep their type for the template's format spec.
        params = {k: v.render(lang) if isinstance(v, Message) else v for k, v in self.params.items()}
        return MESSAGES.text(self.key, lang, **params)

    def __str__(self) -> str:
        return self.render("en")


def say(key: str, **params: Any) -> Message:
    return Message(key, params)


def joined(items: Iterable[Message], key: str = "list.and") -> Message | None:
    """Several messages as one, each pair joined by the template `key` ("{a}, {b}"); None when there are none."""
    items = list(items)
    return reduce(lambda a, b: say(key, a=a, b=b), items) if items else None


def text(value: Any, lang: str = "en") -> str:
    """What the UI shows for `value` in `lang`: a Message, or an exception raised with one, worded in that
    language; anything else (an error worded elsewhere) as str() has it."""
    if isinstance(value, Exception) and len(value.args) == 1 and isinstance(value.args[0], Message):
        value = value.args[0]
    return value.render(lang) if isinstance(value, Message) else str(value)
