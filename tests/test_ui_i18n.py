"""Both languages cover every string the UI shows, with the same placeholders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gptoss_webui.ui.i18n import LANGS, detect_lang, t, table

UI = Path(__file__).resolve().parent.parent / "gptoss_webui" / "ui"


def test_tables_have_the_same_keys_and_placeholders():
    en, zh = table("en"), table("zh")
    assert set(en) == set(zh), {"only en": set(en) - set(zh), "only zh": set(zh) - set(en)}
    for key in en:
        assert set(re.findall(r"{(\w+)}", en[key])) == set(re.findall(r"{(\w+)}", zh[key])), key


def test_every_key_used_in_the_code_exists():
    used = set()
    for path in UI.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        used |= set(re.findall(r'"((?:app|tab|state|train|serve|chat|msg)\.[a-z_.]+)"', text))
    dynamic = {k for k in used if k.endswith(".")}  # prefixes such as "state." + name
    missing = {k for k in used - dynamic - _config_paths() if k not in table("en")}
    # Form fields are labelled through FormField.key: check those too.
    from gptoss_webui.ui.form import FIELDS

    missing |= {f.key for f in FIELDS if f.key not in table("en")}
    assert not missing


def _config_paths() -> set[str]:
    """Dotted Recipe paths (train.data.path ...) appear in the code too; they are not UI strings."""
    from gptoss_webui.config import Recipe

    out: set[str] = set()

    def walk(node, prefix):
        for k, v in node.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                walk(v, prefix + k + ".")

    walk(Recipe().model_dump(mode="json"), "")
    return out


def test_run_states_are_translated():
    from gptoss_webui.runs import RUN_STATES

    for lang in LANGS:
        assert all(f"state.{s}" in table(lang) for s in RUN_STATES)


@pytest.mark.parametrize(("header", "lang"), [
    ("zh-CN,zh;q=0.9,en;q=0.8", "zh"), ("en-US,en;q=0.9,zh;q=0.5", "en"), ("fr-FR,zh-TW;q=0.3", "zh"),
    ("", "en"), (None, "en"), ("de", "en"), ("en;q=0.2, zh;q=0.7", "zh")])
def test_detect_lang(header, lang):
    assert detect_lang(header) == lang


def test_t_formats_and_falls_back():
    assert t("train.progress", "zh", step=1, total=6, pct=16) == "第 1 / 6 步（16%）"
    assert t("no.such.key", "zh") == "no.such.key"
    assert t("tab.train", "xx") == "Train"
