"""One training step under torch.profiler: where its time goes. Shared by bench/train.py and bench/unsloth_row.py,
so that our rows and Unsloth's are profiled the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def profile_step(step: Callable[[], Any], device: str, top: int = 20) -> dict[str, Any]:
    """Run step() once more under torch.profiler: kernel time by name, and the wall time (what no kernel ran of it is
    launch and host overhead). Prints the profiler's table; returns the top `top` kernels [name, ms, calls]."""
    import time

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        step()
        wall = time.perf_counter() - t  # step() synchronizes the device before it returns
    events = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if device == "cuda" else "CPU")]
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    busy_ms = sum(getattr(e, attr) for e in events) / 1e3
    print(prof.key_averages().table(sort_by=attr, row_limit=40), flush=True)
    return {"wall_ms": round(wall * 1e3, 1), "kernel_ms": round(busy_ms, 1),
            "top": [[e.key[:90], round(getattr(e, attr) / 1e3, 1), e.count] for e in events[:top]]}
