"""The engine's processes and ports: liveness that survives pid reuse, the whole vLLM process tree, free ports.

vLLM's API server starts an EngineCore and workers that can outlive it, so stopping an engine means finding
all of them (engine_members) and waiting until they are really gone (processes.wait_gone), then until the port
is free. Liveness that survives pid reuse is gptoss_webui.processes', shared with training runs.
"""

from __future__ import annotations

import socket
import time

import psutil

from gptoss_webui.processes import alive, group_members


def engine_members(pid: int, create_time: float | None) -> list[psutil.Process]:
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
    for p in group_members(pid, create_time, match=_is_vllm):
        found.setdefault(p.pid, p)
    return list(found.values())


def owns_port(pid: int, create_time: float | None, port: int) -> bool:
    """Does the engine, or a process it started, listen on `port`? Another server that answers there (a second
    checkout's engine, say) is not ours. Where the system will not tell, trust the port as before."""
    for p in engine_members(pid, create_time):
        try:
            conns = p.net_connections(kind="inet")
        except psutil.AccessDenied:
            return True
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            return True
    return False


def _is_vllm(p: psutil.Process) -> bool:
    return "vllm" in f"{p.name()} {' '.join(p.cmdline() or [])}".lower()


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
