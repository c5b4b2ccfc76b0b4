"""Processes started in their own session (training runs, the vLLM engine) that must be found again later, by
another process or after a UI restart: liveness that survives pid reuse, and a process group's members.

A recorded pid can belong to another program after a reboot, so liveness compares the process's creation time
with the one recorded at start."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import psutil


def start_time_of(pid: int) -> float | None:
    """The process's creation time (what alive() compares to tell a reused pid apart), None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int | None, create_time: float | None) -> bool:
    """Is the process we started still running? False for a zombie, and for a pid reused by another program."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_members(pgid: int, create_time: float | None = None,
                  match: Callable[[psutil.Process], bool] | None = None) -> list[psutil.Process]:
    """Processes in process group `pgid` (created no earlier than the group's leader, when its creation time is
    known), optionally filtered by `match`: what is left of a session after its leader is gone."""
    found = []
    for p in psutil.process_iter(["create_time"]):
        try:
            if (os.getpgid(p.pid) == pgid and (create_time is None or p.info["create_time"] >= create_time - 1.0)
                    and (match is None or match(p))):
                found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until the processes have exited; returns those still running. A zombie counts as gone: an
    orphaned child may wait for a reaper that never comes (PID 1 in a container often is none)."""
    deadline = time.time() + timeout
    while True:
        running = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    running.append(p)
            except psutil.Error:
                continue
        if not running or time.time() > deadline:
            return running
        time.sleep(0.1)
