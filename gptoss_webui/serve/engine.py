"""The vLLM engine: one OpenAI-compatible server process per app, its state, and its LoRA adapters.

`Engine` starts `python -m vllm.entrypoints.openai.api_server` in its own session (log to a file, never
a PIPE), waits for /health, and explains a failed start from the log tail instead of hanging. Its state
(starting / running / stopped / crashed, model, adapters, port) lives in a small object and in one file per
workspace, paths.engine_state_file() (workspace/engine.json, /data/engine.json in Docker), which the CLI and the UI
share: each sees the engine the other started, and a restarted UI reattaches to one still running.

Adapters are hot-loaded (POST /v1/load_lora_adapter) where vLLM can run LoRA for the architecture and
merged into the weights where it cannot (gpt-oss on the CPU build: see plan.lora_support). After a
hot-load the adapter's greedy output is compared with the base's: vLLM serves the base model silently
when an adapter's module names do not match, so identical outputs raise a warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from gptoss_webui import processes
from gptoss_webui.config import ServeConfig
from gptoss_webui.hardware import visible_ids
from gptoss_webui.logs import tail
from gptoss_webui.paths import engine_state_file
from gptoss_webui.serve import plan, procs
from gptoss_webui.serve.diagnose import explain_failure

STATES = ("stopped", "starting", "running", "crashed")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Fixed probe for "does the adapter change anything": greedy, so base and adapter are comparable.
PROBE_PROMPT = "The quick brown fox jumps over the lazy dog. Then it"
PROBE_TOKENS = 8

Progress = Callable[[str], None]


class EngineError(Exception):
    """An engine problem worded for the user (the UI shows it as is; the CLI prints it, exit 2)."""


@dataclass
class AdapterCheck:
    name: str
    path: str
    changed: bool  # the adapter's greedy probe differs from the base's
    message: str


@dataclass
class EngineInfo:
    """A snapshot of the engine, JSON-serializable (paths.engine_state_file() holds one)."""

    state: str = "stopped"
    model: str = ""                   # the folder (or hub name) vLLM loads
    model_spec: str = ""              # as the user gave it, e.g. demo:tiny-gpt-oss
    served_name: str = ""             # the model name clients send
    model_type: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    pid: int | None = None
    create_time: float | None = None  # tells our pid apart from a reused one after a reboot
    log_path: str = ""
    command: list[str] = field(default_factory=list)
    started_at: float | None = None
    ready_at: float | None = None
    start_timeout_s: float = 600.0
    lora_enabled: bool = False
    lora_note: str = ""               # why LoRA is on or off for this engine
    max_lora_rank: int = 0
    adapter_mode: str = "none"        # none | hotload | merge
    adapters: dict[str, str] = field(default_factory=dict)  # hot-loaded name -> adapter folder
    merged_from: dict[str, str] = field(default_factory=dict)  # merge mode: served name -> adapter folder
    pending_adapters: dict[str, str] = field(default_factory=dict)  # to hot-load once healthy
    gpus: list[int] = field(default_factory=list)  # the GPU ids it holds (the training queue waits for them)
    api_key_env: str | None = None    # set when the engine requires an API key (non-loopback host)
    phase: str = ""                   # what a starting engine is doing: preparing, merging ..., loading model
    notes: list[str] = field(default_factory=list)  # user-facing remarks: port changed, merge chosen, ...
    error: str | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    @property
    def model_names(self) -> list[str]:
        return [self.served_name, *self.adapters] if self.served_name else []

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> EngineInfo:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Engine:
    """Owns at most one vLLM server process. Thread-safe; every method returns quickly except
    start (with wait=True), wait_ready, load_adapter (runs a probe) and stop."""

    def __init__(self, state_path: str | Path | None = None) -> None:
        self.state_path = Path(state_path) if state_path else engine_state_file()
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self.info = self._load()
        self._stamp = self._file_stamp()

    # --- state ----------------------------------------------------------------------------------
    def _load(self) -> EngineInfo:
        try:
            info = EngineInfo.from_json(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return EngineInfo()
        if info.state in ("starting", "running") and not processes.alive(info.pid, info.create_time):
            info.state = "crashed"
            info.error = info.error or (f"the engine process (pid {info.pid}) ended while no app was "
                                        f"watching it; log: {info.log_path}")
        return info

    def _save(self) -> None:
        from gptoss_webui.runs import atomic_write_text

        atomic_write_text(self.state_path, self.info.to_json())
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> int | None:
        try:
            return self.state_path.stat().st_mtime_ns
        except OSError:
            return None

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
            if self._file_stamp() != self._stamp:  # another process (the CLI, the UI) changed it: take its word
                self.info, self._stamp = self._load(), self._file_stamp()
            info = self.info
            if info.state in ("starting", "running") and not self._running():
                self._mark_crashed(self._exit_cause())
            elif info.state == "starting":
                if _healthy(info, timeout=1.0):
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
              adapter_mode: plan.AdapterMode = "auto", enable_lora: bool | None = None,
              strict_port: bool = False, wait: bool = True, progress: Progress | None = None) -> EngineInfo:
        """Start an engine for `config` (+ `adapters`, name -> folder, added to config.adapters).

        adapter_mode: auto (hot-load where the engine can run LoRA for the model, else merge), hotload,
        or merge. enable_lora: None = on whenever the architecture allows it, so adapters can be
        hot-loaded later. strict_port: fail on a busy port instead of taking the next free one.
        wait=False returns in state 'starting'; call wait_ready() (it also hot-loads the adapters).
        """
        say = progress or (lambda _msg: None)
        with self._lock:
            if self.status().state in ("starting", "running"):
                raise EngineError(f"an engine is already {self.info.state} ({self.info.served_name or '...'} "
                                  f"on port {self.info.port}): stop it first")
            previous = self.info
            # Visible to status() from other threads while _prepare runs without the lock.
            self.info = EngineInfo(state="starting", phase="preparing", model_spec=config.model,
                                   host=config.host, start_timeout_s=config.start_timeout_s)
        try:
            info = self._prepare(config, {**config.adapters, **(adapters or {})}, adapter_mode, enable_lora,
                                 strict_port, say)
            with self._lock:
                if self.info.state != "starting":
                    raise EngineError("the start was cancelled (stop was pressed while preparing)")
                self._launch(info, config)
        except BaseException as exc:
            with self._lock:
                if self.info.pid is None:  # nothing launched: back to where we were, with the reason
                    self.info = previous
                    if isinstance(exc, EngineError):
                        self.info.error = str(exc)
            if isinstance(exc, (plan.PlanError, OSError)):
                raise EngineError(f"cannot start the engine: {exc}") from None
            raise
        say(f"starting vLLM on {info.base_url} (log: {info.log_path})")
        if wait:
            return self.wait_ready(progress=progress)
        return info

    def _prepare(self, config: ServeConfig, adapters: dict[str, str], adapter_mode: plan.AdapterMode,
                 enable_lora: bool | None, strict_port: bool, say: Progress) -> EngineInfo:
        from gptoss_webui.sources import resolve_model

        cpu = plan.engine_is_cpu()
        try:
            model = resolve_model(config.model)
            model_cfg = plan.check_model(model, cpu)
            adapters = {name: str(Path(p).resolve()) for name, p in adapters.items()}
            adapter_plan = plan.plan_adapters(model_cfg, adapters, adapter_mode, cpu)
        except (plan.PlanError, ValueError) as exc:
            raise EngineError(str(exc)) from None
        can_lora, lora_why = plan.lora_support(model_cfg, cpu)
        info = EngineInfo(model=model, model_spec=config.model, model_type=model_cfg.get("model_type", ""),
                          served_name=_served_name(config.model, model), host=config.host,
                          start_timeout_s=config.start_timeout_s, adapter_mode=adapter_plan.mode)
        # The quick checks first: a merge can take minutes and should not end in "no API key set".
        if adapter_plan.mode == "merge":
            info.lora_enabled, info.lora_note = False, "adapter merged into the weights"
        elif enable_lora is False:
            info.lora_enabled, info.lora_note = False, "LoRA disabled for this engine"
        else:
            if enable_lora and not can_lora:
                raise EngineError(f"cannot enable LoRA: {lora_why}")
            info.lora_enabled, info.lora_note = can_lora, lora_why
        if adapter_plan.mode == "hotload":
            info.pending_adapters = adapters
        if config.host not in LOOPBACK:
            if not os.environ.get(config.api_key_env):
                raise EngineError(f"host {config.host} is reachable from other machines: set an API key in "
                                  f"the environment variable {config.api_key_env} first (or use 127.0.0.1)")
            info.api_key_env = config.api_key_env
        info.port = _pick_port(config.host, config.port, strict_port, info.notes)
        info.gpus = [] if cpu else visible_ids(config.tensor_parallel_size)
        if cpu:
            _check_cpu_memory(model, config.cpu_kv_cache_gib)  # a merged copy is no larger than its base
        if adapter_plan.mode == "merge":
            name, adapter = next(iter(adapters.items()))
            self.info.phase = f"merging adapter '{name}'"
            say(f"{adapter_plan.reason}. Merging '{name}' into the base (own process)...")
            info.model, info.served_name, info.merged_from = self._merge(model, adapter, say), name, {name: adapter}
            info.notes.append(f"serving '{name}' merged into the base ({adapter_plan.reason})")
        return info

    def _merge(self, model: str, adapter: str, say: Progress) -> str:
        from gptoss_webui.serve.merge import MergeError, merge_in_subprocess

        try:
            result = merge_in_subprocess(model, adapter, plan.merged_dir_for(adapter))
        except MergeError as exc:
            raise EngineError(f"merge failed: {exc}") from None
        say(result.summary())
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
        say = progress or (lambda _msg: None)
        while True:
            info = self.status()
            if info.state == "crashed":
                raise EngineError(f"the engine failed to start: {info.error}")
            if info.state == "stopped":
                raise EngineError("the engine was stopped while starting")
            if info.state == "running":
                break
            time.sleep(1.0)
        say(f"engine ready after {info.ready_at - info.started_at:.0f} s: {info.base_url}")
        with self._lock:
            pending, info.pending_adapters = dict(info.pending_adapters), {}
        for name, path in pending.items():
            try:
                check = self.load_adapter(name, path)
                say(check.message)
            except EngineError as exc:  # the engine itself is fine: report the adapter, keep serving
                info.notes.append(f"adapter '{name}' was not loaded: {exc}")
                say(info.notes[-1])
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
            raise EngineError(f"the engine is {info.state}" + (f": {info.error}" if info.error else "")
                              + ("" if info.state == "starting" else "; start it first"))
        return info

    def load_adapter(self, name: str, path: str | Path, check: bool = True) -> AdapterCheck:
        """Hot-load a LoRA adapter under `name`; with check, warn when it does not change the output."""
        info = self._require_running()
        if not info.lora_enabled:
            raise EngineError(f"this engine cannot hot-load adapters: {info.lora_note}. Start it with the "
                              f"adapter instead (it will be merged)")
        path = str(Path(path).resolve())
        try:
            rank = plan.adapter_rank(path)
        except plan.PlanError as exc:
            raise EngineError(str(exc)) from None
        if name == info.served_name or name in info.adapters:
            raise EngineError(f"the name '{name}' is already served: pick another or unload it first")
        if rank > info.max_lora_rank:
            raise EngineError(f"adapter '{name}' has LoRA rank {rank}; this engine was started for ranks up "
                              f"to {info.max_lora_rank}: restart it with serve.max_lora_rank >= {rank}")
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if plan.read_adapter_config(path).get("target_parameters"):
            # peft's fused 3-D expert layout (gpt-oss experts); vLLM consults it for mixed MoE formats only.
            body["is_3d_lora_weight"] = True
        self._post("/v1/load_lora_adapter", body, f"loading adapter '{name}'")
        with self._lock:
            info.adapters[name] = path
            self._save()
        if not check:
            return AdapterCheck(name, path, True, f"adapter '{name}' loaded (not checked)")
        base, tuned = self._probe(info.served_name), self._probe(name)
        # Same tokens and log-probs up to kernel noise (LoRA and plain kernels round differently on GPUs).
        if base[0] == tuned[0] and all(abs(a - b) < 1e-3 for a, b in zip(base[1], tuned[1], strict=False)):
            msg = (f"WARNING: adapter '{name}' gives the base model's greedy output and log-probs. "
                   "Either it is untrained, or its module names do not match this model and vLLM is serving "
                   "the base model")
            info.notes.append(msg)
            self._save()
            return AdapterCheck(name, path, False, msg)
        return AdapterCheck(name, path, True, f"adapter '{name}' loaded; it changes the model's output")

    def unload_adapter(self, name: str) -> None:
        info = self._require_running()
        if name not in info.adapters:
            loaded = ", ".join(info.adapters) or "none"
            raise EngineError(f"no adapter named '{name}' is loaded (loaded: {loaded})")
        self._post("/v1/unload_lora_adapter", {"lora_name": name}, f"unloading adapter '{name}'")
        with self._lock:
            info.adapters.pop(name, None)
            self._save()

    def models(self) -> list[str]:
        """Model names the engine serves right now (base or merged model first, then adapters)."""
        info = self._require_running()
        data = self._request("GET", "/v1/models", None, "listing models")
        return [m["id"] for m in data.get("data", [])] if isinstance(data, dict) else [info.served_name]

    def complete(self, model: str, prompt: str | list[int], max_tokens: int = 16, **params: Any) -> dict:
        """A raw /v1/completions call (no chat template): greedy by default, with token ids returned."""
        self._require_running()
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "return_token_ids": True, **params}
        return self._request("POST", "/v1/completions", body, f"completion from '{model}'")

    def _probe(self, model: str) -> tuple[list[int], list[float]]:
        out = self.complete(model, PROBE_PROMPT, PROBE_TOKENS, logprobs=1)
        choice = out["choices"][0]
        logprobs = list((choice.get("logprobs") or {}).get("token_logprobs") or [])
        return list(choice.get("token_ids") or []), logprobs

    def _post(self, path: str, body: dict, what: str, hint: str = "") -> None:
        self._request("POST", path, body, what, hint)

    def _request(self, method: str, path: str, body: dict | None, what: str, hint: str = "") -> Any:
        info = self.info
        url = info.base_url.removesuffix("/v1") + path
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            resp = httpx.request(method, url, json=body, headers=headers, timeout=120.0)
        except httpx.HTTPError as exc:
            self.status()
            raise EngineError(f"{what} failed: the engine did not answer ({exc.__class__.__name__}); "
                              f"state {self.info.state}" + (f": {self.info.error}" if self.info.error else "")
                              ) from None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error", {}).get("message") or resp.text
            except ValueError:
                message = resp.text
            raise EngineError(f"{what} failed: {message.strip()[:500]}{hint}")
        try:
            return resp.json()
        except ValueError:
            return resp.text


# --- command line and environment ---------------------------------------------------------------

def build_command(info: EngineInfo, config: ServeConfig) -> list[str]:
    """The vLLM server command for `info` (model, port, LoRA) and `config` (sizes, flags)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", info.model, "--served-model-name", info.served_name,
           "--host", info.host, "--port", str(info.port),
           "--dtype", config.dtype, "--max-model-len", str(config.max_model_len),
           "--tensor-parallel-size", str(config.tensor_parallel_size)]
    if not plan.engine_is_cpu():
        cmd += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    if config.block_size:
        cmd += ["--block-size", str(config.block_size)]
    if config.enforce_eager:
        cmd.append("--enforce-eager")
    if info.model_type == "gpt_oss":
        cmd += ["--reasoning-parser", "openai_gptoss"]
    if info.lora_enabled:
        wanted = max([config.max_lora_rank, *(plan.adapter_rank(p) for p in info.pending_adapters.values())])
        rank = info.max_lora_rank = plan.vllm_lora_rank(wanted)
        if rank != config.max_lora_rank:
            accepted = ", ".join(map(str, plan.VLLM_LORA_RANKS))
            info.notes.append(f"max LoRA rank {rank} (vLLM accepts {accepted}; configured "
                              f"{config.max_lora_rank}, adapters need {wanted})")
        cmd += ["--enable-lora", "--max-loras", str(max(config.max_loras, len(info.pending_adapters))),
                "--max-lora-rank", str(rank)]
    return cmd


def build_env(info: EngineInfo, config: ServeConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               TOKENIZERS_PARALLELISM="false")
    if info.lora_enabled:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if plan.engine_is_cpu():
        # Required on the CPU (else vLLM sizes the cache from memory other programs are using); whole GiB.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(config.cpu_kv_cache_gib)))
    if info.api_key_env:
        # Through the environment rather than --api-key: a command line is visible to every user in `ps`.
        env["VLLM_API_KEY"] = os.environ[info.api_key_env]
    if info.model_type == "gpt_oss":
        # openai_harmony (the chat path of gpt-oss) loads o200k ranks from here instead of the internet.
        from gptoss_webui.tokenizer import o200k_ranks_file

        try:
            env["TIKTOKEN_ENCODINGS_BASE"] = str(o200k_ranks_file().parent)
        except RuntimeError as exc:
            raise EngineError(f"gpt-oss chat needs the o200k ranks file: {exc}") from None
    return env


# --- helpers --------------------------------------------------------------------------------------

def _served_name(spec: str, model: str) -> str:
    """demo:tiny-gpt-oss -> tiny-gpt-oss; runs/x/merged -> x-merged; a folder -> its name; a hub id as is."""
    if spec.startswith("demo:"):
        return spec.removeprefix("demo:")
    path = Path(model)
    if not path.exists():
        return spec
    path = path.resolve()
    return f"{path.parent.name}-merged" if path.name == "merged" else path.name


def _healthy(info: EngineInfo, timeout: float) -> bool:
    try:
        return httpx.get(info.base_url.removesuffix("/v1") + "/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _pick_port(host: str, port: int, strict: bool, notes: list[str]) -> int:
    if procs.port_free(host, port):
        return port
    if strict:
        raise EngineError(f"port {port} on {host} is already in use by another program: pick another port")
    for candidate in range(port + 1, min(port + 200, 65536)):
        if procs.port_free(host, candidate):
            notes.append(f"port {port} was in use; the engine listens on {candidate}")
            return candidate
    raise EngineError(f"ports {port}-{port + 199} on {host} are all in use: pick another port")


def _check_cpu_memory(model: str, kv_gib: float) -> None:
    """On the CPU the weights and the KV cache share RAM with everything else: refuse what cannot fit."""
    weights = sum(p.stat().st_size for p in Path(model).glob("*.safetensors")) / 2**30
    free = psutil.virtual_memory().available / 2**30
    need = weights + max(1, math.ceil(kv_gib))
    if need > free:
        raise EngineError(f"not enough free memory: the weights ({weights:.1f} GiB) and the KV cache "
                          f"({max(1, math.ceil(kv_gib))} GiB) need {need:.1f} GiB, {free:.1f} GiB is free. "
                          "Lower serve.cpu_kv_cache_gib or close other programs")
