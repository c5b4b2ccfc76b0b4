"""The run's event stream: `runs/<name>/events.jsonl`, one JSON object per line, append-only.

One writer (the training worker, rank 0) and one reader (this module's `EventReader`, used by the UI
and the CLI). Every event has `type` and `time` (unix seconds). Types and their fields:

  start       world_size, model, trainable_params, total_params, total_steps, resumed_from_step,
              base_weights (mxfp4 | bf16: the experts' form), base_weights_note (why not the one asked for, or ""),
              train_items, validation_items (examples, or packed blocks), data (train.data.DataStats as a dict),
              data_summary (the same in one English line), setup_s ({"data": s, "model": s}: reading the data;
              loading the model and wrapping it with LoRA),
              config (a short summary dict)
  step        step, total, epoch, loss, lr, grad_norm, tokens_per_s, peak_mem_gib, elapsed_s, eta_s
  eval        step, eval_loss
  checkpoint  step, path, save_s (from the step's end to the checkpoint on disk, an eval at that step included)
  done        step, adapter_path, elapsed_s
  stopped     step, checkpoint (path or null): the run was asked to stop and saved its state
  error       message (for a person), log_tail (last lines of train.log)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENT_TYPES = ("start", "step", "eval", "checkpoint", "done", "stopped", "error")
FINAL_TYPES = ("done", "stopped", "error")


class EventWriter:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, type: str, **fields: Any) -> dict[str, Any]:
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}; known: {', '.join(EVENT_TYPES)}")
        event = {"type": type, "time": round(time.time(), 3), **fields}
        line = json.dumps(event, ensure_ascii=False, default=str) + "\n"
        # One write() of one line in append mode: readers never see a torn line in practice,
        # and the reader below also ignores a trailing partial line until it is complete.
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        return event


@dataclass
class EventReader:
    """Incremental reader: `poll()` returns the events appended since the last call."""

    path: Path
    _offset: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        new = []
        for raw in complete.splitlines():
            try:
                new.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        self.events.extend(new)
        return new

    # --- summaries used by the UI and the CLI ----------------------------------------------------
    def last(self, type: str | None = None) -> dict[str, Any] | None:
        for event in reversed(self.events):
            if type is None or event["type"] == type:
                return event
        return None

    def steps(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "step"]

    def final(self) -> dict[str, Any] | None:
        """The closing event of the latest attempt (a resume starts a new attempt with `start`)."""
        for event in reversed(self.events):
            if event["type"] == "start":
                return None
            if event["type"] in FINAL_TYPES:
                return event
        return None


def read_all(path: Path) -> list[dict[str, Any]]:
    reader = EventReader(Path(path))
    reader.poll()
    return reader.events
