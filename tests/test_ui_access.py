"""Access policy: loopback by default, auth off-loopback, and the UI reads only workspace/runs files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_webui.ui.access import (
    AUTH_ENV,
    AccessError,
    check_path,
    is_loopback,
    outside_paths,
    redact,
    resolve_auth,
)

REPO = Path(__file__).resolve().parent.parent


def test_loopback_needs_no_auth(monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert resolve_auth("127.0.0.1", None, False) is None
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_public_bind_needs_auth_or_insecure(monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    with pytest.raises(AccessError, match="--auth"):
        resolve_auth("0.0.0.0", None, False)
    assert resolve_auth("0.0.0.0", None, True) is None
    assert resolve_auth("0.0.0.0", "ann:s3cret", False) == ("ann", "s3cret")
    monkeypatch.setenv(AUTH_ENV, "bob:pw:with:colons")
    assert resolve_auth("0.0.0.0", None, False) == ("bob", "pw:with:colons")


def test_bad_auth_is_refused_without_echoing_it():
    with pytest.raises(AccessError) as info:
        resolve_auth("0.0.0.0", "justapassword", False)
    assert "justapassword" not in str(info.value)


def test_paths_outside_the_workspace_are_refused(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "a.jsonl").write_text("{}\n")
    monkeypatch.setenv("GPTOSS_WORKSPACE", str(ws))
    runs = tmp_path / "runs"
    assert check_path(str(ws / "data" / "a.jsonl"), runs) is None
    assert check_path("demo:harmony", runs) is None
    assert check_path("HuggingFaceH4/Multilingual-Thinking", runs) is None  # a hub name, not a file
    assert check_path("/etc/passwd", runs) == "outside"
    assert check_path(str(ws / "data" / ".." / ".." / "x"), runs) == "outside"


def _file_field_keys(model: type, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, is a dict) of every field the typed config marks as naming files (config.READS_FILES)."""
    import typing

    from pydantic import BaseModel

    keys = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            keys += _file_field_keys(info.annotation, f"{prefix}{name}.")
        elif (info.json_schema_extra or {}).get("reads_files"):
            keys.append((f"{prefix}{name}", typing.get_origin(info.annotation) is dict))
    return keys


def test_every_path_the_form_can_set_is_checked_the_free_form_box_included(tmp_path, monkeypatch):
    """`hostfile=/etc/passwd` in "More settings" once showed the file in the Log box (DeepSpeed quotes a bad
    hostfile); a serve model typed in the Serve tab was only checked for being a model folder. Every field the
    typed config marks as naming files is tried, through the free-form box."""
    from gptoss_webui.config import ConfigError, Recipe, ServeConfig
    from gptoss_webui.ui.form import FIELDS, form_values
    from gptoss_webui.ui.train_tab import _recipe

    monkeypatch.setenv("GPTOSS_WORKSPACE", str(tmp_path / "ws"))
    runs, base = tmp_path / "runs", Recipe().model_dump(mode="json")
    values = form_values(Recipe(), FIELDS)
    assert _recipe(str(runs), "en", base, "optim.warmup_ratio=0.1", values).train.optim.warmup_ratio == 0.1
    keys = _file_field_keys(Recipe)
    assert {k for k, _ in keys} >= {"train.model", "train.data.path", "train.hostfile", "serve.model",
                                    "serve.adapters"}
    for key, is_dict in keys:
        line, shown = (f"{key}={{x: /etc/passwd}}", f"{key}.x") if is_dict else (f"{key}=/etc/passwd", key)
        with pytest.raises(ConfigError, match=f"{shown}: /etc/passwd: the web UI only reads files inside"):
            _recipe(str(runs), "en", base, line, values)
    assert outside_paths(Recipe(serve=ServeConfig(model="/etc")), runs) == ["serve.model: /etc"]


def test_webui_refuses_a_public_host_without_auth():
    env = {k: v for k, v in os.environ.items() if k != AUTH_ENV}
    proc = subprocess.run([sys.executable, str(REPO / "webui.py"), "--host", "0.0.0.0", "--port", "1"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 2
    assert "--auth user:password" in proc.stderr and "--insecure" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_secrets_are_redacted_from_what_the_page_shows(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz0123")
    monkeypatch.setenv("GPTOSS_API_KEY", "my-engine-key")
    monkeypatch.setenv(AUTH_ENV, "ann:pw-123456")
    text = ("token hf_abcdefghijklmnopqrstuvwxyz0123 key my-engine-key auth ann:pw-123456 "
            "other sk-ABCDEFGHIJKLMNOPQRSTUVWX and hf_ZZZZZZZZZZZZZZZZZZZZZZZZZZ")
    out = redact(text)
    for secret in ("hf_abc", "my-engine-key", "pw-123456", "sk-ABC", "hf_ZZZ"):
        assert secret not in out
    assert redact("plain log line") == "plain log line"
