"""The runs directory: one folder per training run, and the small status file written into it.

Layout of runs/<name>/:
  config.yaml      the resolved Recipe the run was launched with
  status.json      {"state", "pid", "pgid", "command", ...}, written atomically by the launcher
  events.jsonl     append-only progress events (gptoss_webui.events)
  train.log        everything the deepspeed launcher and the ranks print
  checkpoints/     Trainer checkpoints (resume points)
  adapter/         the final LoRA adapter + tokenizer + README.md
  merged/          the adapter merged into the base (written by `merge`)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_STATES = ("created", "queued", "running", "stopping", "stopped", "finished", "failed")


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Run:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "status.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {"state": "created"}

    def write_status(self, **fields: Any) -> dict[str, Any]:
        status = {**self.read_status(), **fields, "updated_at": time.time()}
        atomic_write_text(self.path / "status.json", json.dumps(status, indent=1))
        return status

    def latest_checkpoint(self) -> Path | None:
        """The newest complete Trainer checkpoint (checkpoint-<step> holding trainer_state.json)."""
        done = [p for p in self.checkpoints_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


class RunsDir:
    def __init__(self, root: str | Path = "runs") -> None:
        self.root = Path(root)

    def create(self, name: str | None = None) -> Run:
        """Make a new run folder; refuses a name that is already taken rather than mixing two runs."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise PermissionError(f"cannot create the runs folder {self.root.resolve()}: permission denied; give "
                                  "one you can write (runs_dir in the recipe, --runs-dir for the UI)") from None
        if name is None:
            name = time.strftime("run-%Y%m%d-%H%M%S")
            base, n = name, 1
            while (self.root / name).exists():
                n += 1
                name = f"{base}-{n}"
        path = self.root / name
        try:
            path.mkdir()
        except FileExistsError:
            raise FileExistsError(
                f"run folder {path} already exists: pick another run_name, resume that run, "
                "or delete the folder") from None
        except PermissionError:
            raise PermissionError(f"cannot write in the runs folder {self.root.resolve()}: permission denied; give "
                                  "one you can write (runs_dir in the recipe, --runs-dir for the UI)") from None
        return Run(path)

    def get(self, name: str) -> Run:
        """A run by folder name, or by path (as printed by `train`)."""
        path = Path(name) if Path(name).is_dir() else self.root / name
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"no run named '{name}' in {self.root} (no config.yaml there)")
        return Run(path)

    def list(self) -> list[Run]:
        """Runs, newest first."""
        if not self.root.is_dir():
            return []
        runs = [Run(p) for p in self.root.iterdir() if (p / "config.yaml").is_file()]
        return sorted(runs, key=lambda r: r.config_path.stat().st_mtime, reverse=True)
