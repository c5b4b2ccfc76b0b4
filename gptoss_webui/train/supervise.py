"""Runs the deepspeed command for one run and records how it ended (status.json, a final event).

    python -m gptoss_webui.train.supervise RUN_DIR -- deepspeed ...

It is the session leader of the run's process group, so `stop` can end everything at once. A queued run's
supervisor first waits for its GPUs (train/queue.py), then starts the ranks. The ranks
write their own final event (done/stopped/error); when none came (a rank was killed, the launcher
failed) this writes an `error` event with the log tail, so nothing ends silently.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from gptoss_webui.events import EventReader, EventWriter
from gptoss_webui.logs import tail
from gptoss_webui.runs import Run
from gptoss_webui.train import queue

END_STATES = {"done": "finished", "stopped": "stopped", "error": "failed"}
QUEUE_POLL_S = 2.0
SHM_DIR = Path("/dev/shm")


def log_tail(run: Run, lines: int = 40) -> str:
    return tail(run.log_path, max_bytes=256_000, lines=lines)


def killing_signal(tail: str) -> str | None:
    """The signal that ended a rank, from DeepSpeed's launcher line "[...] exits with return code = -9". That line
    quotes the last rank's command whichever rank died (launch.py formats the loop's last `cmd`), so it names no
    rank; `RankWatch` does."""
    for line in reversed(tail.splitlines()):
        m = re.search(r"exits with return code = (-\d+)", line)
        if m:
            return signal.Signals(-int(m.group(1))).name
    return None


class RankWatch:
    """Which ranks vanished first: polled while the launcher runs, since DeepSpeed kills the others about a second
    after one dies and then reports the death under the wrong rank."""

    def __init__(self, launcher_pid: int) -> None:
        self.launcher_pid = launcher_pid
        self.ranks: dict[int, int] = {}  # pid -> local rank, of every rank seen
        self.first_gone: list[int] = []

    def poll(self) -> None:
        from gptoss_webui.train.launcher import worker_processes

        alive = set()
        for proc in worker_processes(self.launcher_pid):
            try:
                rank = next(int(a.split("=", 1)[1]) for a in proc.cmdline() if a.startswith("--local_rank="))
            except (StopIteration, ValueError, psutil.Error):
                continue
            self.ranks[proc.pid] = rank
            alive.add(proc.pid)
        gone = sorted(rank for pid, rank in self.ranks.items() if pid not in alive)
        if gone and alive and not self.first_gone:  # some ranks died while others still ran
            self.first_gone = gone

    def describe(self) -> str:
        if len(self.first_gone) == 1:
            return f"training rank {self.first_gone[0]}"
        if self.first_gone:
            return f"training ranks {', '.join(map(str, self.first_gone))}"
        return "a training rank"


def remove_allreduce_buffers(cmd: list[str], shm_dir: Path = SHM_DIR) -> list[Path]:
    """Delete the shared-memory files of this run's ranks, once they are gone. DeepSpeed's CPU allreduce
    (deepspeed/ops/csrc/cpu/comm/shm.cpp) makes one 66 MiB file per rank in /dev/shm, named by uid, master
    address, master port and rank, and never removes it: RAM lost for good on every CPU run (19 GB after a day
    of test runs here). The master port in the command names this run's files."""
    if "--master_port" not in cmd:
        return []
    port = cmd[cmd.index("--master_port") + 1]
    removed = sorted(shm_dir.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"the training processes were killed by {name}"
    return f"the training processes exited with code {code}"


def main(argv: list[str]) -> int:
    run = Run(Path(argv[0]))
    cmd = argv[argv.index("--") + 1:]
    # Stop requests go to the ranks (they save first); this process must outlive them to record the end.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with queue.ledger_lock(run.path.parent):  # the launcher has recorded the run's state once this is free
        queued = run.read_status().get("state") == "queued"
    if queued:  # wait for the GPUs (train/queue.py); `stop` ends this process while it waits
        print(f"{queue.place(run)}; waiting", flush=True)
        while not queue.claim(run):
            time.sleep(QUEUE_POLL_S)
        print("the GPUs are free: starting", flush=True)
    launcher = subprocess.Popen(cmd)
    watch = RankWatch(launcher.pid)
    while launcher.poll() is None:
        watch.poll()
        time.sleep(0.2)
    code = launcher.returncode
    remove_allreduce_buffers(cmd)
    reader = EventReader(run.events_path)
    reader.poll()
    final = reader.final()
    sig = killing_signal(log_tail(run, 400)) if code != 0 else None
    if sig is not None and (final is None or final["type"] == "error"):
        # The surviving ranks only see a broken connection, and their tracebacks say nothing about the cause:
        # name the rank that really died, and leave the log (train.log) to whoever wants the details.
        final = EventWriter(run.events_path).emit(
            "error", message=f"{watch.describe()} was killed by {sig} (out of host memory, or killed by hand); "
            f"the other ranks stopped with it; details in {run.log_path}. Resume continues from the last "
            "checkpoint", log_tail="")
    if final is None:
        stopping = run.read_status().get("state") == "stopping"
        if stopping:
            latest = run.latest_checkpoint()
            final = EventWriter(run.events_path).emit("stopped", step=None,
                                                      checkpoint=str(latest) if latest else None)
        else:
            message = describe_exit(code) + " before reporting an end; the log tail says why"
            if code == 0:
                message = "the training processes exited without reporting an end"
            final = EventWriter(run.events_path).emit("error", message=message, log_tail=log_tail(run))
    run.write_status(state=END_STATES[final["type"]], returncode=code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
