"""The engine's processes and ports: liveness that survives pid reuse, the whole vLLM process tree, free ports.

vLLM's API server starts an EngineCore and workers that can outlive it, so stopping an engine means finding
all of them (group_members) and waiting until they are really gone (wait_gone), then until the port is free.
"""

from __future__ import annotations

import os
import socket
import time

import psutil


def start_time_of(pid: int) -> float | None:
    """The process's creation time (what alive() compares to tell a reused pid apart), None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int | None, create_time: float | None) -> bool:
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False  # the pid was reused by another program
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_members(pid: int, create_time: float | None) -> list[psutil.Process]:
    """The engine and everything it started: its descendants, plus vLLM processes left in its process
    group when the server itself is gone (EngineCore and workers outlive a killed API server)."""
    found: dict[int, psutil.Process] = {}
    if alive(pid, create_time):
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
        except psutil.Error:
            pass
    for p in psutil.process_iter(["name", "cmdline", "create_time"]):
        try:
            if (p.pid not in found and os.getpgid(p.pid) == pid
                    and (create_time is None or p.info["create_time"] >= create_time - 1.0)
                    and "vllm" in f"{p.info['name']} {' '.join(p.info['cmdline'] or [])}".lower()):
                found[p.pid] = p
        except (OSError, psutil.Error):
            continue
    return list(found.values())


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until the processes have exited; returns those still running. A zombie counts as gone: an
    orphaned EngineCore may wait for a reaper that never comes (PID 1 in a container often is none)."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                continue
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def port_free(host: str, port: int) -> bool:
    """Could a server listen on host:port now? With SO_REUSEADDR, like vLLM's own socket: connections
    left in TIME_WAIT by a stopped engine do not block it, a program listening there does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def wait_port_free(host: str, port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while port and not port_free(host, port) and time.time() < deadline:
        time.sleep(0.2)
