"""Both languages cover every string the UI shows, with the same placeholders: the UI's labels and the pipeline's
messages (gptoss_webui/locales), which the Train tab shows in the page's language."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gptoss_webui.messages import MESSAGES
from gptoss_webui.ui.i18n import LANGS, UI, detect_lang, t, table

PACKAGE = Path(__file__).resolve().parent.parent / "gptoss_webui"


@pytest.mark.parametrize("catalog", [UI, MESSAGES], ids=["ui", "messages"])
def test_tables_have_the_same_keys_and_placeholders(catalog):
    en, zh = catalog.table("en"), catalog.table("zh")
    assert set(en) == set(zh), {"only en": set(en) - set(zh), "only zh": set(zh) - set(en)}
    for key in en:  # the same names with the same format specs ({gib:.1f}), so numbers read alike
        assert set(re.findall(r"{(\w+[^}]*)}", en[key])) == set(re.findall(r"{(\w+[^}]*)}", zh[key])), key


def test_every_message_the_pipeline_says_exists():
    said = set()
    for path in PACKAGE.rglob("*.py"):
        code = path.read_text(encoding="utf-8")
        if "from gptoss_webui.messages import" in code:  # another `say` (engine_ctl's progress) is not this one
            said |= set(re.findall(r'\bsay\(\s*"([\w.]+)"', code))
            said |= set(re.findall(r'\bjoined\([^\n]*"([\w.]+)"\)', code))
    said |= {"list.and"}  # joined()'s default
    assert said == set(MESSAGES.table("en")), {"missing": said - set(MESSAGES.table("en")),
                                               "never said": set(MESSAGES.table("en")) - said}
    assert not set(MESSAGES.table("en")) & set(table("en")), "a key in both catalogs"


def test_every_key_used_in_the_code_exists():
    used = set()
    for path in (PACKAGE / "ui").glob("*.py"):
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


def test_every_message_reads_in_chinese():
    """Every message the pipeline says has its own Chinese wording (only pure notation is the same in both), and
    nested messages follow the outer one's language."""
    from gptoss_webui.messages import say

    en, zh = MESSAGES.table("en"), MESSAGES.table("zh")
    assert {k for k in en if en[k] == zh[k]} == {"memory.plus", "memory.setup.zero", "config.lines"}
    # punctuation only
    joiners = {"memory.plus", "memory.setup.zero", "list.and", "memory.verdict.remedy", "config.lines"}
    assert not [k for k in zh if k not in joiners and not re.search(r"[\u4e00-\u9fff]", zh[k])]
    verdict = say("memory.verdict.remedy", verdict=say("memory.verdict.no_fit", total=30.04, over=6.5, gpu=23.5),
                  remedy=say("memory.no_fix"))
    assert verdict.render("zh") == ("放不下：每张 GPU 需要 30.0 GiB，比 23.5 GiB 的显卡多出 6.5 GiB；"
                                    "这里尝试过的改动都放不下（需要 4 位专家/QLoRA 或显存更大的显卡）")
    assert str(verdict) == ("does not fit: needs 30.0 GiB per GPU, 6.5 GiB over a 23.5 GiB card; no change tried "
                            "here makes it fit (4-bit experts/QLoRA or larger cards would be needed)")
