"""Who may reach the UI, and which files it may touch.

Loopback needs no login; any other bind address needs --auth user:password (or GPTOSS_WEBUI_AUTH)
unless --insecure is given. Paths typed or picked in the page must stay inside the workspace and the
runs folder (or be a demo:/hub name), so a remote user cannot read arbitrary files through a preview.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from gptoss_webui.paths import workspace_dir

AUTH_ENV = "GPTOSS_WEBUI_AUTH"
MAX_UPLOAD = "200mb"  # gradio's max_file_size: datasets larger than this belong on disk, not in a form


_SECRET_ENV = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|AUTH", re.I)
_SECRET_TEXT = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})")


class AccessError(ValueError):
    """A launch setting that would expose the UI without protection; worded for the person launching it."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(raw: str) -> tuple[str, str]:
    user, sep, password = raw.partition(":")
    if not sep or not user or not password:
        # Never echo `raw`: it may be a password typed with a typo.
        raise AccessError("--auth must look like user:password (both parts non-empty)")
    return user, password


def resolve_auth(host: str, auth: str | None, insecure: bool) -> tuple[str, str] | None:
    """The (user, password) to require, None for no login; refuses an unprotected public bind."""
    raw = auth or os.environ.get(AUTH_ENV) or None
    if raw:
        return parse_auth(raw)
    if is_loopback(host) or insecure:
        return None
    raise AccessError(
        f"--host {host} makes the UI reachable from other machines: give --auth user:password "
        f"(or set {AUTH_ENV}), or pass --insecure if the network is trusted")


def allowed_roots(runs_dir: str | Path) -> list[Path]:
    return [workspace_dir(), Path(runs_dir).resolve()]


def check_path(value: str, runs_dir: str | Path) -> str | None:
    """None when `value` is fine for the UI to read; otherwise the reason (English; the UI localizes)."""
    value = (value or "").strip()
    if not value or value.startswith("demo:"):
        return None
    path = Path(value).expanduser()
    if not path.exists() and not value.startswith(("/", ".", "~")) and value.count("/") <= 1:
        return None  # a hub name (org/name) or a `datasets` name, resolved from the cache
    resolved = path.resolve()
    roots = allowed_roots(runs_dir)
    if any(resolved == r or r in resolved.parents for r in roots):
        return None
    return "outside"


def outside_paths(recipe, runs_dir: str | Path) -> list[str]:
    """`key: value` for every file or folder the recipe names (config.file_fields: the model, the dataset, the
    DeepSpeed hostfile, whose text DeepSpeed prints back when it is bad, the served model and adapters) that the UI
    may not read, whichever widget or free-form line set it."""
    from gptoss_webui.config import file_fields

    return [f"{key}: {value}" for key, value in file_fields(recipe) if check_path(value, runs_dir)]


def redact(text: str) -> str:
    """Logs and error messages on their way to the page: hide token-like strings and the values of
    secret-looking environment variables (HF_TOKEN, *_API_KEY, GPTOSS_WEBUI_AUTH...)."""
    if not text:
        return text
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and len(value) >= 6 and value in text:
            text = text.replace(value, "***")
    return _SECRET_TEXT.sub("***", text)
