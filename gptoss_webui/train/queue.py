"""The GPU ledger and the queue: which GPU ids each job holds, and the runs waiting for theirs.

The ledger is what is on disk already: a running (or stopping) run holds the ids in its status.json `gpus`, and a
running serving engine holds those in the workspace's engine.json. A run launched onto ids that are held, or that a
run queued before it waits for, is `queued`: its supervisor starts at once, in its own session like any run, and
polls `claim` until the ids are free and nobody is ahead; then it starts the ranks. So the queue needs no service,
survives a UI restart, and a queued run is cancelled the way a running one is stopped. Deciding and recording go
under one lock file per runs folder, so two launches never both see free GPUs.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from gptoss_webui.config import TrainConfig
from gptoss_webui.hardware import visible_ids
from gptoss_webui.messages import Message, joined, say
from gptoss_webui.paths import engine_state_file
from gptoss_webui.runs import Run, RunsDir
from gptoss_webui.serve.state import read_state

LOCK_NAME = ".gpu-ledger.lock"
HOLDING = ("running", "stopping")


def planned_gpus(cfg: TrainConfig, world: int) -> list[int]:
    """The GPU ids a run of `world` ranks will use (the launcher passes the visible ones to DeepSpeed). On a CPU
    host they stand for the ranks' slots, so CPU runs queue too."""
    return visible_ids(world)


@contextlib.contextmanager
def ledger_lock(runs_dir: str | Path) -> Iterator[None]:
    root = Path(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _engine_gpus() -> list[int]:
    """The GPU ids a live serving engine holds, from its state file (read_state checks its process)."""
    info = read_state(engine_state_file())
    return list(info.gpus) if info.live else []


def holders(runs_dir: str | Path, gpus: list[int], me: Run | None = None) -> list[Message]:
    """Who holds any of `gpus` now: 'run NAME (GPUs 0,1)' for running runs, 'the serving engine (GPU 0)'."""
    from gptoss_webui.train.launcher import run_state

    wanted, found = set(gpus), []
    for run in RunsDir(runs_dir).list():
        if run.path == getattr(me, "path", None) or run_state(run) not in HOLDING:
            continue
        held = run.read_status().get("gpus")
        held = set(wanted if held is None else held)  # a run from before the ledger: assume it holds them all
        if held & wanted:
            found.append(say("queue.run_holds", name=run.name, gpus=_ids(held & wanted)))
    engine = set(_engine_gpus()) & wanted
    if engine:
        found.append(say("queue.engine_holds", gpus=_ids(engine)))
    return found


def ahead_of(runs_dir: str | Path, gpus: list[int], me: Run | None = None) -> list[Run]:
    """Queued runs waiting for any of `gpus` that were queued before `me` (all of them when `me` is new)."""
    from gptoss_webui.train.launcher import run_state

    mine = (me.read_status().get("queued_at") if me else None) or float("inf")
    ahead = []
    for run in RunsDir(runs_dir).list():
        if run.path == getattr(me, "path", None) or run_state(run) != "queued":
            continue
        status = run.read_status()
        if set(status.get("gpus") or []) & set(gpus) and status.get("queued_at", 0) < mine:
            ahead.append(run)
    return sorted(ahead, key=lambda r: r.read_status().get("queued_at", 0))


def claim(run: Run) -> bool:
    """For a queued run's supervisor: mark it running when its GPUs are free and no run queued before it wants
    them; False to keep waiting."""
    with ledger_lock(run.path.parent):
        gpus = run.read_status().get("gpus") or []
        if holders(run.path.parent, gpus, me=run) or ahead_of(run.path.parent, gpus, me=run):
            return False
        run.write_status(state="running")
        return True


def waiting_for(runs_dir: str | Path, gpus: list[int], me: Run | None = None) -> list[Message]:
    """What a run on `gpus` waits for: the jobs that hold them, then the runs queued before it."""
    return holders(runs_dir, gpus, me=me) + [say("queue.ahead", name=r.name) for r in ahead_of(runs_dir, gpus, me=me)]


def place(run: Run) -> Message:
    """A queued run's place, in words: what it waits for."""
    gpus = run.read_status().get("gpus") or []
    behind = joined(waiting_for(run.path.parent, gpus, me=run)) or say("queue.nothing")
    return say("queue.place", gpus=_ids(gpus), behind=behind)


def _ids(gpus) -> str:
    return ",".join(str(g) for g in sorted(gpus))
