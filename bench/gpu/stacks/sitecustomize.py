"""Samples where each Python process spends its time: with GPTOSS_STACKS_DIR set, a daemon thread writes the main
thread's stack every GPTOSS_STACKS_EVERY_S (default 0.2 s) to DIR/stacks-<pid>.txt, one line a sample:
`unix time<TAB>innermost frame < ... < outermost`, each frame `folder/file:function:line`. bench/serve.py's
--sample-stacks puts this folder on the engine's PYTHONPATH; `python -m bench.stacks DIR` sums the samples up.
A forked child (vLLM forks its EngineCore) starts its own sampler. Writes nothing to stdout."""

import os
import sys
import threading
import time


def _frames(frame, depth: int = 40) -> str:
    parts = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        where = os.path.join(os.path.basename(os.path.dirname(code.co_filename)), os.path.basename(code.co_filename))
        parts.append(f"{where}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(parts)


def _sample(path: str, every_s: float, main_id: int) -> None:
    with open(path, "a", buffering=1) as out:
        while True:
            time.sleep(every_s)
            frame = sys._current_frames().get(main_id)
            if frame is not None:
                out.write(f"{time.time():.3f}\t{_frames(frame)}\n")


def _start() -> None:
    folder = os.environ.get("GPTOSS_STACKS_DIR")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"stacks-{os.getpid()}.txt")
    every_s = float(os.environ.get("GPTOSS_STACKS_EVERY_S", "0.2"))
    threading.Thread(target=_sample, args=(path, every_s, threading.main_thread().ident), daemon=True,
                     name="gptoss-stacks").start()


if os.environ.get("GPTOSS_STACKS_DIR"):
    _start()
    os.register_at_fork(after_in_child=_start)
