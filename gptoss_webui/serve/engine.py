"""The vLLM engine process: one OpenAI-compatible server per workspace, started, watched, stopped.

`Engine` starts `python -m vllm.entrypoints.openai.api_server` (command and environment from launch.py) in its
own session (log to a file, never a PIPE), waits for /health, and explains a failed start from the log tail
instead of hanging. Its state (state.py) lives in the workspace's engine.json, shared by the CLI and the UI.

How each adapter is served is policy.py's decision. A hot-loaded adapter (POST /v1/load_lora_adapter, client.py)
is checked afterwards: vLLM serves the base model silently when an adapter's module names do not match, so
greedy output and log-probs equal to the base's raise a warning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from gptoss_webui import processes
from gptoss_webui.config import ServeConfig
from gptoss_webui.hardware import visible_ids
from gptoss_webui.logs import tail
from gptoss_webui.messages import Message, say
from gptoss_webui.paths import engine_state_file
from gptoss_webui.serve import plan, policy, procs
from gptoss_webui.serve.client import EngineUnreachable, ServerClient, healthy
from gptoss_webui.serve.diagnose import explain_failure
from gptoss_webui.serve.launch import build_command, build_env, check_cpu_memory, pick_port, served_name
from gptoss_webui.serve.state import EngineError, EngineInfo, read_state, stamp, write_state

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

Progress = Callable[[Message], None]  # a line for the user: str() is English, render(lang) for the UI


@dataclass
class AdapterCheck:
    name: str
    path: str
    changed: bool  # the adapter's greedy probe differs from the base's
    message: Message  # str() is English


class Engine:
    """Owns at most one vLLM server process. Thread-safe; every method returns quickly except
    start (with wait=True), wait_ready, load_adapter (runs a probe) and stop."""

    def __init__(self, state_path: str | Path | None = None) -> None:
        self.state_path = Path(state_path) if state_path else engine_state_file()
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self.info = read_state(self.state_path)
        self._stamp = stamp(self.state_path)

    # --- state ----------------------------------------------------------------------------------
    def _save(self) -> None:
        write_state(self.state_path, self.info)
        self._stamp = stamp(self.state_path)

    def _running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return processes.alive(self.info.pid, self.info.create_time)

    def status(self) -> EngineInfo:
        """Refresh and return the state: a dead process is 'crashed' (with the cause from its log), and so
        is one that has not answered /health within start_timeout_s."""
        with self._lock:
            if self.info.state == "starting" and self.info.pid is None:
                return self.info  # start() is still preparing (a merge can take minutes): no process yet
            if (now := stamp(self.state_path)) != self._stamp:
                if now is None and self.info.live:  # deleted under a live engine: our record stands
                    self._save()
                else:  # another process (the CLI, the UI) changed it: take its word
                    self.info, self._stamp = read_state(self.state_path), now
                    if self._proc is not None and self._proc.pid != self.info.pid:
                        # The engine we started was replaced: how it ended says nothing about the new one, and a
                        # verdict from it would mark the new engine crashed (and kill it).
                        self._proc = None
            info = self.info
            if info.live and not self._running():
                self._mark_crashed(self._exit_cause())
            elif info.state == "starting":
                if healthy(info.base_url, timeout=1.0) and procs.owns_port(info.pid, info.create_time, info.port):
                    info.state, info.ready_at = "running", time.time()
                    info.phase = "loading adapters" if info.pending_adapters else ""
                    self._save()
                elif time.time() > (info.started_at or 0) + info.start_timeout_s:
                    cause = explain_failure(tail(info.log_path))
                    hint = "" if cause.startswith("the engine stopped") else f"; last error logged: {cause}"
                    self._mark_crashed(f"no answer on /health within {info.start_timeout_s:.0f} s{hint} "
                                       f"(log: {info.log_path})")
            return info

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.info.log_path, lines=lines)

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.info.api_key_env) if self.info.api_key_env else None

    def _exit_cause(self) -> str:
        code = self._proc.poll() if self._proc is not None else None
        cause = explain_failure(tail(self.info.log_path))
        if cause == "the engine stopped without an error message":
            if code is None:  # reattached: another process was its parent, the exit status is not ours
                cause = "the engine process ended unexpectedly"
            else:
                cause = f"the engine process ended ({f'signal {-code}' if code < 0 else f'exit code {code}'})"
        return f"{cause} (log: {self.info.log_path})"

    def _mark_crashed(self, error: str) -> None:
        self._kill()  # the API server may be gone while its EngineCore/worker children still hold memory
        self.info.state, self.info.error, self.info.phase = "crashed", error, ""
        self._save()

    # --- start ----------------------------------------------------------------------------------
    def start(self, config: ServeConfig, *, adapters: dict[str, str] | None = None,
              adapter_mode: policy.AdapterMode = "auto", enable_lora: bool | None = None,
              strict_port: bool = False, wait: bool = True, progress: Progress | None = None) -> EngineInfo:
        """Start an engine for `config` (+ `adapters`, name -> folder, added to config.adapters).

        adapter_mode: auto (policy.choose_mode decides, and says why), hotload, or merge. enable_lora: None =
        on whenever the architecture allows it, so adapters can be hot-loaded later. strict_port: fail on a
        busy port instead of taking the next free one.
        wait=False returns in state 'starting'; call wait_ready() (it also hot-loads the adapters).
        """
        tell = progress or (lambda _msg: None)
        with self._lock:
            if self.status().live:
                raise EngineError(say("serving.engine.already", state=self.info.state,
                                      name=self.info.served_name or "...", port=self.info.port))
            previous = self.info
            # Visible to status() from other threads while _prepare runs without the lock.
            self.info = EngineInfo(state="starting", phase="preparing", model_spec=config.model,
                                   host=config.host, start_timeout_s=config.start_timeout_s)
        try:
            info = self._prepare(config, {**config.adapters, **(adapters or {})}, adapter_mode, enable_lora,
                                 strict_port, tell)
            with self._lock:
                if self.info.state != "starting":
                    raise EngineError(say("serving.engine.cancelled"))
                self._launch(info, config)
        except BaseException as exc:
            with self._lock:
                if self.info.pid is None:  # nothing launched: back to where we were, with the reason
                    self.info = previous
                    if isinstance(exc, EngineError):
                        self.info.error = str(exc)
            if isinstance(exc, (plan.PlanError, OSError)):
                raise EngineError(say("serving.engine.cannot_start", error=plan.cause(exc))) from None
            raise
        tell(say("serving.engine.starting", url=info.base_url, log=info.log_path))
        if wait:
            return self.wait_ready(progress=progress)
        return info

    def _prepare(self, config: ServeConfig, adapters: dict[str, str], adapter_mode: policy.AdapterMode,
                 enable_lora: bool | None, strict_port: bool, tell: Progress) -> EngineInfo:
        from gptoss_webui.sources import resolve_model

        cpu = plan.engine_is_cpu()
        try:
            model = resolve_model(config.model)
            model_cfg = plan.check_model(model, cpu)
            adapters = {name: str(Path(p).resolve()) for name, p in adapters.items()}
            for adapter in adapters.values():
                plan.check_adapter_base(model, adapter)
            adapter_plan = policy.plan_adapters(model, model_cfg, adapters, adapter_mode, config, cpu)
            merged = next(iter(adapters.values())) if adapter_plan.mode == "merge" else None
            plan.check_mxfp4_serving(model_cfg, merged, config.dtype, cpu)
        except (plan.PlanError, ValueError) as exc:
            raise EngineError(plan.cause(exc)) from None
        can_lora, lora_why = plan.lora_support(model_cfg, cpu)
        info = EngineInfo(model=model, model_spec=config.model, model_type=model_cfg.get("model_type", ""),
                          served_name=served_name(config.model, model), host=config.host,
                          start_timeout_s=config.start_timeout_s, adapter_mode=adapter_plan.mode)
        # The quick checks first: a merge can take minutes and should not end in "no API key set".
        if adapter_plan.mode == "merge":
            info.lora_enabled, info.lora_note = False, "adapter merged into the weights"
        elif enable_lora is False:
            info.lora_enabled, info.lora_note = False, "LoRA disabled for this engine"
        else:
            if enable_lora and not can_lora:
                raise EngineError(say("serving.engine.cannot_enable_lora", why=lora_why))
            info.lora_enabled, info.lora_note = can_lora, str(lora_why)
        if adapter_plan.mode == "hotload":
            info.pending_adapters = adapters
            tell(say("serving.engine.hotload_later", names=", ".join(adapters), reason=adapter_plan.reason))
        if config.host not in LOOPBACK:
            if not os.environ.get(config.api_key_env):
                raise EngineError(say("serving.engine.api_key", host=config.host, env=config.api_key_env))
            info.api_key_env = config.api_key_env
        info.port = pick_port(config.host, config.port, strict_port, info.notes)
        info.gpus = [] if cpu else visible_ids(config.tensor_parallel_size)
        if cpu:
            check_cpu_memory(model, config.cpu_kv_cache_gib)  # a merged copy is no larger than its base
        if adapter_plan.mode == "merge":
            name, adapter = next(iter(adapters.items()))
            self.info.phase = f"merging adapter '{name}'"
            tell(say("serving.engine.merging", reason=adapter_plan.reason, name=name))
            info.model, info.served_name, info.merged_from = self._merge(model, adapter, tell), name, {name: adapter}
            info.notes.append(str(say("serving.engine.merged_note", name=name, reason=adapter_plan.reason)))
        return info

    def _merge(self, model: str, adapter: str, tell: Progress) -> str:
        from gptoss_webui.serve.merge import MergeError, merge_in_subprocess

        try:
            result = merge_in_subprocess(model, adapter, plan.merged_dir_for(adapter))
        except MergeError as exc:
            raise EngineError(say("serving.engine.merge_failed", error=plan.cause(exc))) from None
        tell(result.summary())
        return result.out_dir

    def _launch(self, info: EngineInfo, config: ServeConfig) -> None:
        info.command = build_command(info, config)
        env = build_env(info, config)
        log_path = self.state_path.with_name("engine.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        info.log_path = str(log_path)
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(f"# {' '.join(info.command)}\n")
            log.flush()
            # Own session: stop() signals the whole group (API server, EngineCore, workers) at once.
            self._proc = subprocess.Popen(info.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        info.pid = self._proc.pid
        info.create_time = processes.start_time_of(self._proc.pid)
        info.state, info.started_at, info.error, info.phase = "starting", time.time(), None, "loading model"
        self.info = info
        self._save()

    def wait_ready(self, progress: Progress | None = None) -> EngineInfo:
        """Wait for /health (then hot-load the pending adapters), or raise EngineError with the cause.

        Gives up after the config's start_timeout_s (status() enforces it and stops the process)."""
        tell = progress or (lambda _msg: None)
        while True:
            info = self.status()
            if info.state == "crashed":
                raise EngineError(say("serving.engine.failed_start", error=info.error))
            if info.state == "stopped":
                raise EngineError(say("serving.engine.stopped_starting"))
            if info.state == "running":
                break
            time.sleep(0.25)  # a start is timed launch to ready (start_s): a coarser poll adds up to its period
        tell(say("serving.engine.ready", seconds=info.ready_at - info.started_at, url=info.base_url))
        with self._lock:
            pending, info.pending_adapters = dict(info.pending_adapters), {}
        for name, path in pending.items():
            try:
                check = self.load_adapter(name, path)
                tell(check.message)
            except EngineError as exc:  # the engine itself is fine: report the adapter, keep serving
                note = say("serving.engine.not_loaded", name=name, error=plan.cause(exc))
                info.notes.append(str(note))
                tell(note)
        info.phase = ""
        self._save()
        return self.info

    # --- stop -----------------------------------------------------------------------------------
    def stop(self, timeout: float = 20.0) -> EngineInfo:
        """End the whole process tree (SIGTERM, then SIGKILL after `timeout`) and wait for the port."""
        with self._lock:
            was = self.info.state
            self._kill(timeout)
            self.info.state, self.info.phase = "stopped", ""
            if was != "crashed":  # after a crash, the cause stays readable
                self.info.error = None
            self.info.adapters, self.info.pending_adapters = {}, {}
            self._save()
            return self.info

    def _kill(self, timeout: float = 20.0) -> None:
        pid = self.info.pid
        if pid is None:
            return
        members = procs.engine_members(pid, self.info.create_time)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not members:
                break
            for p in members:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(sig)
            members = processes.wait_gone(members, timeout if sig == signal.SIGTERM else 10.0)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)  # reap our child so it is not left a zombie
            self._proc = None
        procs.wait_port_free(self.info.host, self.info.port, 10.0)

    # --- adapters -------------------------------------------------------------------------------
    def _require_running(self) -> EngineInfo:
        info = self.status()
        if info.state != "running":
            said = (say("serving.engine.state_error", state=info.state, error=info.error) if info.error
                    else say("serving.engine.state", state=info.state))
            raise EngineError(said if info.state == "starting" else say("serving.engine.start_first", error=said))
        return info

    def load_adapter(self, name: str, path: str | Path, check: bool = True) -> AdapterCheck:
        """Hot-load a LoRA adapter under `name`; with check, warn when it does not change the output."""
        info = self._require_running()
        if not info.lora_enabled:
            raise EngineError(say("serving.engine.no_hotload", note=info.lora_note))
        path = str(Path(path).resolve())
        try:
            rank = plan.adapter_rank(path)
            plan.check_adapter_base(info.model, path)
            fused_experts = plan.touches_experts(path)
        except plan.PlanError as exc:
            raise EngineError(plan.cause(exc)) from None
        if name == info.served_name or name in info.adapters:
            raise EngineError(say("serving.engine.name_taken", name=name))
        if rank > info.max_lora_rank:
            raise EngineError(say("serving.engine.rank", name=name, rank=rank, max_rank=info.max_lora_rank))
        self._http(lambda server: server.load_lora(name, path, fused_experts))
        with self._lock:
            info.adapters[name] = path
            self._save()
        if not check:
            return AdapterCheck(name, path, True, say("serving.engine.loaded_unchecked", name=name))
        base, tuned = self._http(lambda server: (server.probe(info.served_name), server.probe(name)))
        # Same tokens and log-probs up to kernel noise (LoRA and plain kernels round differently on GPUs).
        if base[0] == tuned[0] and all(abs(a - b) < 1e-3 for a, b in zip(base[1], tuned[1], strict=False)):
            msg = say("serving.engine.no_change", name=name)
            info.notes.append(str(msg))
            self._save()
            return AdapterCheck(name, path, False, msg)
        return AdapterCheck(name, path, True, say("serving.engine.loaded", name=name))

    def unload_adapter(self, name: str) -> None:
        info = self._require_running()
        if name not in info.adapters:
            loaded = ", ".join(info.adapters) or say("serving.engine.loaded_none")
            raise EngineError(say("serving.engine.no_such_adapter", name=name, loaded=loaded))
        self._http(lambda server: server.unload_lora(name))
        with self._lock:
            info.adapters.pop(name, None)
            self._save()

    def models(self) -> list[str]:
        """Model names the engine serves right now (base or merged model first, then adapters)."""
        info = self._require_running()
        return self._http(lambda server: server.models()) or [info.served_name]

    def complete(self, model: str, prompt: str | list[int], max_tokens: int = 16, **params: Any) -> dict:
        """A raw /v1/completions call (no chat template): greedy by default, with token ids returned."""
        self._require_running()
        return self._http(lambda server: server.complete(model, prompt, max_tokens, **params))

    def _http(self, call: Callable[[ServerClient], Any]) -> Any:
        """Run `call` against the server; when nothing answers, say what became of the process."""
        try:
            return call(ServerClient(self.info.base_url, self.api_key))
        except EngineUnreachable as exc:
            self.status()
            said = (say("serving.engine.unreachable_error", error=str(exc), state=self.info.state,
                        cause=self.info.error) if self.info.error
                    else say("serving.engine.unreachable", error=str(exc), state=self.info.state))
            raise EngineError(said) from None
