"""What the Train tab shows about one run, read only from its folder (status, events.jsonl, train.log).

Nothing is kept in the UI process but a per-file read offset, so a closed tab, a reload or a UI restart
shows the same thing: the run folder is the truth.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_webui.events import EventReader
from gptoss_webui.messages import Message
from gptoss_webui.runs import Run, RunsDir

LOG_TAIL_BYTES = 6000
_readers: dict[Path, EventReader] = {}
_lock = threading.Lock()


def _events(run: Run) -> list[dict[str, Any]]:
    """All events of the run; an incremental reader per file, shared by every browser session."""
    with _lock:
        reader = _readers.get(run.events_path)
        if reader is None:
            reader = _readers[run.events_path] = EventReader(run.events_path)
        try:
            size = run.events_path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < reader._offset:  # the file was replaced (a run folder deleted and re-created)
            reader = _readers[run.events_path] = EventReader(run.events_path)
        reader.poll()
        return list(reader.events)


def run_state(run: Run) -> str:
    try:
        from gptoss_webui.train.launcher import run_state as launcher_state
    except ImportError:
        return str(run.read_status().get("state", "created"))
    return launcher_state(run)


@dataclass
class RunView:
    name: str
    state: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    peak_mem_gib: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    final: dict[str, Any] | None = None
    error: str | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    data: Message | None = None  # what preparing the data did: the start event's train.data.DataStats, in words
    queue_place: Message | None = None  # a queued run: what it waits for (train/queue.place)
    n_events: int = 0

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    @property
    def can_stop(self) -> bool:
        return self.state in ("queued", "running")  # a queued run's Stop takes it out of the queue

    @property
    def can_resume(self) -> bool:
        return self.state in ("stopped", "failed")


def view(run: Run) -> RunView:
    events = _events(run)
    v = RunView(name=run.name, state=run_state(run), n_events=len(events))
    if v.state == "queued":
        from gptoss_webui.train.queue import place

        v.queue_place = place(run)
    for e in events:
        kind = e.get("type")
        if kind == "start":
            v.total = int(e.get("total_steps") or v.total)
            v.step = int(e.get("resumed_from_step") or v.step)
            v.data = _data_summary(e.get("data"))
            v.error = None
        elif kind == "step":
            v.step, v.total = int(e.get("step", v.step)), int(e.get("total") or v.total)
            v.loss, v.lr = e.get("loss"), e.get("lr")
            v.tokens_per_s, v.peak_mem_gib = e.get("tokens_per_s"), e.get("peak_mem_gib")
            v.elapsed_s, v.eta_s = e.get("elapsed_s"), e.get("eta_s")
            if e.get("loss") is not None:
                # A resumed run replays no steps, but drop any point the resume rewinds past.
                v.losses = [p for p in v.losses if p[0] < v.step] + [(v.step, float(e["loss"]))]
        elif kind == "eval" and e.get("eval_loss") is not None:
            v.eval_losses.append((int(e.get("step", 0)), float(e["eval_loss"])))
        elif kind == "error":
            v.error = str(e.get("message") or "")
        if kind == "done":
            v.step = int(e.get("step") or v.step)
    for e in reversed(events):
        if e.get("type") == "start":
            break
        if e.get("type") in ("done", "stopped", "error"):
            v.final = e
            break
    return v


def _data_summary(stats: dict[str, Any] | None) -> Message | None:
    if not stats:
        return None
    from gptoss_webui.train.data import DataStats

    return DataStats(**stats).summary()


def run_names(runs_dir: str | Path) -> list[str]:
    return [r.name for r in RunsDir(runs_dir).list()]


def pick_default(runs_dir: str | Path) -> str | None:
    """The run to reattach to when a page opens: the newest running one, else the newest one."""
    runs = RunsDir(runs_dir).list()
    for r in runs:
        if run_state(r) in ("queued", "running", "stopping"):
            return r.name
    return runs[0].name if runs else None


def loss_frame(v: RunView):
    """Training loss per step for gr.LinePlot (eval loss goes in the metrics line: a second colour
    series added after the first render is drawn without a stroke by gradio's plot)."""
    import pandas as pd

    return pd.DataFrame(v.losses, columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
