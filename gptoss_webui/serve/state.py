"""The engine's state: what runs, where, with which adapters, and the file that holds it.

One file per workspace, paths.engine_state_file() (workspace/engine.json, /data/engine.json in Docker), which
the CLI and the UI share: each sees the engine the other started, and a restarted UI reattaches to one still
running. A state read back is checked against the process table, so an engine that died while nobody watched
reads as 'crashed'.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptoss_webui import processes
from gptoss_webui.runs import atomic_write_text

STATES = ("stopped", "starting", "running", "crashed")


class EngineError(Exception):
    """An engine problem worded for the user (the UI shows it as is; the CLI prints it, exit 2)."""


@dataclass
class EngineInfo:
    """A snapshot of the engine, JSON-serializable (paths.engine_state_file() holds one)."""

    state: str = "stopped"
    model: str = ""                   # the folder (or hub name) vLLM loads
    model_spec: str = ""              # as the user gave it, e.g. demo:tiny-gpt-oss
    served_name: str = ""             # the model name clients send
    model_type: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    pid: int | None = None
    create_time: float | None = None  # tells our pid apart from a reused one after a reboot
    log_path: str = ""
    command: list[str] = field(default_factory=list)
    started_at: float | None = None
    ready_at: float | None = None
    start_timeout_s: float = 600.0
    lora_enabled: bool = False
    lora_note: str = ""               # why LoRA is on or off for this engine
    max_lora_rank: int = 0
    adapter_mode: str = "none"        # none | hotload | merge
    adapters: dict[str, str] = field(default_factory=dict)  # hot-loaded name -> adapter folder
    merged_from: dict[str, str] = field(default_factory=dict)  # merge mode: served name -> adapter folder
    pending_adapters: dict[str, str] = field(default_factory=dict)  # to hot-load once healthy
    gpus: list[int] = field(default_factory=list)  # the GPU ids it holds (the training queue waits for them)
    api_key_env: str | None = None    # set when the engine requires an API key (non-loopback host)
    phase: str = ""                   # what a starting engine is doing: preparing, merging ..., loading model
    notes: list[str] = field(default_factory=list)  # user-facing remarks: port changed, merge chosen, ...
    error: str | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    @property
    def live(self) -> bool:
        return self.state in ("starting", "running")

    @property
    def model_names(self) -> list[str]:
        return [self.served_name, *self.adapters] if self.served_name else []

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> EngineInfo:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def read_state(path: Path) -> EngineInfo:
    """The state in `path` (stopped when there is none); a live state whose process is gone reads 'crashed'."""
    try:
        info = EngineInfo.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return EngineInfo()
    if info.live and not processes.alive(info.pid, info.create_time):
        info.state = "crashed"
        info.error = info.error or (f"the engine process (pid {info.pid}) ended while no app was "
                                    f"watching it; log: {info.log_path}")
    return info


def write_state(path: Path, info: EngineInfo) -> None:
    atomic_write_text(path, info.to_json())


def stamp(path: Path) -> int | None:
    """When `path` last changed (None when absent): tells a write by another process apart from ours."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
