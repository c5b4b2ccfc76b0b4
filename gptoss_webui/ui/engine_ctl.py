"""The UI's handle on the one vLLM engine: serve/engine.py's Engine plus a background task runner;
how a run's adapter is served is serve/policy.py's decision, which it executes.

Starting an engine (and merging an adapter first) takes tens of seconds to minutes, longer than a
click should block; the task runs in a thread and records what it says, and every page polls
`snapshot()`. The engine's own state lives in paths.engine_state_file(), the workspace's engine.json that
`python -m gptoss_webui serve` writes and reads too: a reloaded page, a restarted UI and the CLI all find a
running engine again (the engine runs in its own session and outlives whoever started it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_webui.config import ServeConfig
from gptoss_webui.messages import Message, say
from gptoss_webui.paths import engine_state_file
from gptoss_webui.serve.policy import AdapterMode
from gptoss_webui.serve.state import EngineInfo

Note = Callable[[Message | str], None]  # what a task says; the page words it in its language


@dataclass
class Task:
    name: str  # start / serve_run / load / unload / stop
    messages: list[Message | str] = field(default_factory=list)  # messages.text(m, lang) for the page
    error: Message | str | None = None
    done: bool = False
    started_at: float = field(default_factory=time.time)


@dataclass
class Snapshot:
    state: str  # stopped / starting / running / crashed (the engine's), or "busy" while a task runs
    info: EngineInfo
    task: Task | None
    log_tail: str


class EngineControl:
    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self._engine: Any = None
        self._task: Task | None = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from gptoss_webui.serve.engine import Engine

            self._engine = Engine(self.state_path)
        return self._engine

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done

    def snapshot(self) -> Snapshot:
        task = self._task
        if self.busy:
            # A start or merge is under way in our thread: show its fields (phase, notes) as they are.
            info = self.engine.info
            return Snapshot("busy", info, task, self.engine.log_tail())
        info = self.engine.status()
        return Snapshot(info.state, info, task, self.engine.log_tail() if info.state != "stopped" else "")

    def _run(self, name: str, work: Callable[[Note], None]) -> None:
        with self._lock:
            if self.busy:
                raise RuntimeError(f"busy: {self._task.name if self._task else ''}")
            task = self._task = Task(name)

        def body() -> None:
            try:
                work(task.messages.append)
            except Exception as exc:  # EngineError, MergeError, ...: their messages are for people
                task.error = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], Message) else str(exc)
            finally:
                task.done = True

        threading.Thread(target=body, name=f"engine-{name}", daemon=True).start()

    # --- actions (each returns at once) -----------------------------------------------------------
    def start(self, config: ServeConfig) -> None:
        self._run("start", lambda note: self.engine.start(config, progress=note))

    def stop(self) -> None:
        self._run("stop", lambda note: (self.engine.stop(), note(say("serving.ctl.stopped"))))

    def serve_adapter(self, config: ServeConfig, name: str, adapter: str, mode: AdapterMode) -> None:
        """Serve a run's adapter as serve/policy.py decides (hot-load into the running engine, or start or
        restart it with the adapter hot-loaded or merged); its one-line reason goes first in the task."""

        def work(note: Note) -> None:
            from gptoss_webui.serve.policy import serving_action

            action = serving_action(self.engine.status(), config, name, adapter, mode)
            note(action.reason)
            if action.kind == "hotload_running":
                note(self.engine.load_adapter(name, adapter).message)
                return
            if action.kind == "restart":
                self.engine.stop()
            self.engine.start(config, adapters={name: adapter}, adapter_mode=mode, progress=note)

        self._run("serve_run", work)

    def unload(self, name: str) -> None:
        self._run("unload", lambda note: (self.engine.unload_adapter(name),
                                          note(say("serving.ctl.unloaded", name=name))))


_controls: dict[Path, EngineControl] = {}


def control_for() -> EngineControl:
    """One control per engine state file (one per workspace) in this process, shared by every browser session."""
    path = engine_state_file().resolve()
    if path not in _controls:
        _controls[path] = EngineControl(path)
    return _controls[path]
