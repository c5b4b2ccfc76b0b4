"""Runs the deepspeed command for one run and records how it ended (status.json, a final event).

    python -m gptoss_webui.train.supervise RUN_DIR -- deepspeed ...

It is the session leader of the run's process group, so `stop` can end everything at once. The ranks
write their own final event (done/stopped/error); when none came (a rank was killed, the launcher
failed) this writes an `error` event with the log tail, so nothing ends silently.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from gptoss_webui.events import EventReader, EventWriter
from gptoss_webui.runs import Run

END_STATES = {"done": "finished", "stopped": "stopped", "error": "failed"}


def log_tail(run: Run, lines: int = 40) -> str:
    try:
        return "\n".join(run.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def killed_rank(tail: str) -> tuple[str, str] | None:
    """(rank, signal name) from DeepSpeed's launcher line "[... --local_rank=N ...] exits with return code = -9"."""
    for line in reversed(tail.splitlines()):
        m = re.search(r"--local_rank=(\d+).*exits with return code = (-\d+)", line)
        if m:
            return m.group(1), signal.Signals(-int(m.group(2))).name
    return None


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
    code = subprocess.call(cmd)
    reader = EventReader(run.events_path)
    reader.poll()
    final = reader.final()
    killed = killed_rank(log_tail(run, 400)) if code != 0 else None
    if killed is not None and (final is None or final["type"] == "error"):
        # The surviving ranks only see a broken connection; name the rank that really died.
        rank, sig = killed
        final = EventWriter(run.events_path).emit(
            "error", message=f"training rank {rank} was killed by {sig} (out of host memory, or killed by hand); "
            "the other ranks stopped with it. Resume continues from the last checkpoint",
            log_tail=log_tail(run))
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
