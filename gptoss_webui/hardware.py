"""Which accelerators this host has, and how much memory each holds (nvidia-ml-py; CPU fallback)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_gib: float
    used_gib: float


def gpus() -> list[Gpu]:
    """NVIDIA GPUs visible through NVML; an empty list on a CPU-only host."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append(Gpu(i, name if isinstance(name, str) else name.decode(),
                             mem.total / 2**30, mem.used / 2**30))
        return found
    finally:
        pynvml.nvmlShutdown()


def visible_ids(count: int) -> list[int]:
    """The GPU ids `count` processes or ranks will use: the first of CUDA_VISIBLE_DEVICES, else 0..count-1."""
    visible = [int(i) for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip().isdigit()]
    return (visible or list(range(count)))[:count]


def summary() -> str:
    found = gpus()
    if not found:
        return "CPU"
    return ", ".join(f"GPU{g.index} {g.name}: {g.used_gib:.1f}/{g.total_gib:.1f} GiB" for g in found)
