"""Start, watch, stop and resume training runs. Used by both the CLI and the UI.

launch() checks what can be checked cheaply (model, data, LoRA targets, attention, memory), writes the
run folder, and starts `python -m gptoss_webui.train.supervise`, which runs the real `deepspeed`
launcher and records how it ended. Everything is detached (own session, output to train.log), so the
caller returns at once and any later process (a reloaded page, a restarted UI) can watch the folder.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from gptoss_webui import processes
from gptoss_webui.config import ConfigError, Recipe, TrainConfig
from gptoss_webui.events import EventReader, EventWriter
from gptoss_webui.messages import Message, joined, say
from gptoss_webui.paths import cache_dir
from gptoss_webui.runs import Run, RunsDir
from gptoss_webui.train import queue

WORKER_MODULE = "gptoss_webui.train.worker"
STOP_TIMEOUT_S = 120


class LaunchError(ConfigError):
    """The run cannot start; the message says why and what to change."""


# --- checks before launch ------------------------------------------------------------------------

def preflight(cfg: TrainConfig, force: bool = False) -> None:
    """Fail fast, in this process, on everything that does not need the real weights."""
    from transformers import AutoConfig

    from gptoss_webui.sources import resolve_dataset, resolve_model
    from gptoss_webui.train.attention import choose_attention
    from gptoss_webui.train.data import detect_format, read_rows, to_messages

    model_path = resolve_model(cfg.model)
    if not Path(model_path).is_dir() and not _in_hub_cache(model_path):
        raise LaunchError(say("launch.model_not_found", model=cfg.model))
    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise LaunchError(say("launch.model_config", model=cfg.model, error=str(exc).splitlines()[0])) from None
    if cfg.precision == "fp16" and model_config.model_type == "gpt_oss":
        raise LaunchError(say("launch.fp16"))
    rows = read_rows(cfg.data.model_copy(update={"path": resolve_dataset(cfg.data.path)}))
    fmt = cfg.data.format if cfg.data.format != "auto" else detect_format(rows[0])
    for row in rows:
        to_messages(row, fmt)
    choose_attention(cfg.attention, model_config.model_type, on_gpu=_has_gpu())
    _check_lora_targets(cfg, model_config)
    if cfg.deepspeed.enabled and cfg.deepspeed.offload_optimizer and not _has_gpu():
        raise LaunchError(say("launch.offload_on_cpu"))
    if cfg.hostfile and not Path(cfg.hostfile).is_file():
        raise LaunchError(say("launch.hostfile", path=cfg.hostfile))
    if not force:
        _check_memory(cfg)


def busy_gpu_message(found: list, indices: list[int], needed_gib: float) -> Message | None:
    """Why the GPUs a run will use cannot hold it right now: other processes (a vLLM engine, another job) hold
    memory there, so the card's total, which the estimate is judged against, is not what is free."""
    for gpu in (g for g in found if g.index in indices):
        free = gpu.total_gib - gpu.used_gib
        if needed_gib > free:
            return say("launch.gpu_busy", index=gpu.index, name=gpu.name, free=free, total=gpu.total_gib,
                       used=gpu.used_gib, needed=needed_gib)
    return None


def _check_lora_targets(cfg: TrainConfig, model_config) -> None:
    """Build the model on the meta device (no memory, no weights) to check the LoRA targets."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from gptoss_webui.train.lora import build_peft_config

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    build_peft_config(cfg.lora, model)


def _check_memory(cfg: TrainConfig) -> None:
    from gptoss_webui.train.memory import estimate_for_recipe

    estimate = estimate_for_recipe(cfg)
    if not estimate.fits:
        raise LaunchError(f"{estimate.report()}\nLaunch anyway with --force (CLI) or the Force box (UI).")
    if estimate.offloaded_gib and not cfg.hostfile:  # pinned pages cannot swap: a shortfall kills the run mid-step
        need, have = estimate.offloaded_gib * estimate.world_size, psutil.virtual_memory().available / 2**30
        if need > 0.9 * have:
            raise LaunchError(say("launch.host_memory", need=need, ranks=estimate.world_size, have=have))
    mine = queue.planned_gpus(cfg, world_size(cfg))
    if _has_gpu() and not queue.holders(cfg.runs_dir, mine):  # memory our own jobs hold will be theirs to free
        from gptoss_webui.hardware import gpus

        if message := busy_gpu_message(gpus(), mine, estimate.total_gib):
            raise LaunchError(message)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, local_files_only=True)
        return True
    except Exception:  # not cached, not a valid repo id: both mean "not here"
        return False


# --- the command -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size(cfg: TrainConfig) -> int:
    if cfg.num_gpus:
        return cfg.num_gpus
    from gptoss_webui.hardware import gpus

    return max(1, len(gpus()))


def deepspeed_command(run: Run, cfg: TrainConfig, resume_from: str | None = None) -> list[str]:
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [launcher]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if cfg.hostfile:
        cmd += ["--hostfile", cfg.hostfile]
    elif visible and _has_gpu():
        # DeepSpeed ignores CUDA_VISIBLE_DEVICES once --num_gpus is given: name the visible cards instead.
        cmd += ["--include", "localhost:" + ",".join(visible.split(",")[:world_size(cfg)])]
    else:
        cmd += ["--num_gpus", str(world_size(cfg))]
    cmd += ["--master_port", str(_free_port()), "--module", WORKER_MODULE, "--run", str(run.path)]
    if resume_from:
        cmd += ["--resume-from", str(resume_from)]
    return cmd


def launch_env(cfg: TrainConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # torch.compile's kernel caches in the workspace (Docker's /data volume), not in /tmp: the next launch of the
    # same config loads its compiled layers instead of compiling them again.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))
    env.setdefault("TRITON_CACHE_DIR", str(cache_dir() / "triton"))
    if not _has_gpu():
        # DeepSpeed's CPU accelerator (gloo); one thread per rank beats oversubscribed cores.
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world_size(cfg)))
    return env


def command_line(yaml_path: str) -> str:
    """The CLI line equivalent to pressing Start (shown by the UI's "Show command")."""
    return f"python -m gptoss_webui train --config {shlex.quote(yaml_path)}"


# --- lifecycle ---------------------------------------------------------------------------------

def launch(recipe: Recipe, force: bool = False, wait_in_queue: bool = True) -> Run:
    """Start a run, or queue it when its GPUs are held (train/queue.py); wait_in_queue=False refuses instead, and
    force starts it regardless."""
    preflight(recipe.train, force=force)
    if not wait_in_queue and not force:
        _refuse_if_taken(recipe.train, me=None)
    run = RunsDir(recipe.train.runs_dir).create(recipe.train.run_name)
    recipe.save(run.config_path)
    _start(run, recipe.train, resume_from=None, force=force, wait_in_queue=wait_in_queue)
    return run


def resume(run_name: str, runs_dir: str = "runs", force: bool = False, wait_in_queue: bool = True) -> Run:
    run = RunsDir(runs_dir).get(run_name)
    state = run_state(run)
    if state in ("running", "stopping", "queued"):
        raise LaunchError(f"run {run.name} is still {state}; stop it first")
    if state == "finished":
        raise LaunchError(f"run {run.name} already finished; start a new run to train further")
    recipe = Recipe.from_yaml(run.config_path)
    preflight(recipe.train, force=force)
    if not wait_in_queue and not force:
        _refuse_if_taken(recipe.train, me=run)
    checkpoint = run.latest_checkpoint()
    _start(run, recipe.train, resume_from=str(checkpoint) if checkpoint else None, force=force,
           wait_in_queue=wait_in_queue)
    return run


def _waiting_for(cfg: TrainConfig, me: Run | None) -> list[Message]:
    return queue.waiting_for(cfg.runs_dir, queue.planned_gpus(cfg, world_size(cfg)), me=me)


def _refuse_if_taken(cfg: TrainConfig, me: Run | None, waiting: list[Message] | None = None) -> None:
    """The --no-queue refusal, naming who holds the GPUs (`waiting`, when the caller has already looked)."""
    if waiting := _waiting_for(cfg, me) if waiting is None else waiting:
        gpus = ",".join(map(str, queue.planned_gpus(cfg, world_size(cfg))))
        raise LaunchError(say("launch.gpus_taken", gpus=gpus, holders=joined(waiting)))


def _start(run: Run, cfg: TrainConfig, resume_from: str | None, force: bool = False,
           wait_in_queue: bool = True) -> None:
    cmd = deepspeed_command(run, cfg, resume_from)
    supervisor = [sys.executable, "-m", "gptoss_webui.train.supervise", str(run.path), "--", *cmd]
    # Decide and record under the ledger's lock; the supervisor takes it too before it reads its state.
    with queue.ledger_lock(run.path.parent):
        waiting = [] if force else _waiting_for(cfg, me=run)
        if not wait_in_queue:  # launch/resume checked before; this catches a job that started since
            _refuse_if_taken(cfg, me=run, waiting=waiting)
        with open(run.log_path, "ab") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n".encode())
            if waiting:
                log.write(f"queued: waiting for {joined(waiting)}\n".encode())
            log.flush()
            proc = subprocess.Popen(supervisor, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=launch_env(cfg), start_new_session=True)
        now = time.time()
        run.write_status(state="queued" if waiting else "running", pid=proc.pid, pgid=proc.pid,
                         create_time=processes.start_time_of(proc.pid), command=shlex.join(cmd),
                         resumed_from=resume_from, started_at=now, queued_at=now,
                         gpus=queue.planned_gpus(cfg, world_size(cfg)))


def run_state(run: Run) -> str:
    """created / queued / running / stopping / stopped / finished / failed, repaired if the process vanished."""
    status = run.read_status()
    state = status.get("state", "created")
    if state in ("queued", "running", "stopping") and not processes.alive(status.get("pid"),
                                                                         status.get("create_time")):
        # The supervisor records every ending; if it is gone without one, the machine or it was killed.
        state = "stopped" if state == "stopping" else "failed"
        reader = EventReader(run.events_path)
        reader.poll()
        if reader.final() is None:
            EventWriter(run.events_path).emit(
                "error", message="the training processes disappeared without a final event "
                "(host restart or killed); resume continues from the last checkpoint", log_tail="")
        run.write_status(state=state)
    return state


def is_worker(cmdline: list[str]) -> bool:
    """A rank process (`python -u -m gptoss_webui.train.worker ...`), not the launchers above it."""
    return any(a == "-m" and b == WORKER_MODULE for a, b in zip(cmdline, cmdline[1:], strict=False))


def worker_processes(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            if is_worker(child.cmdline()):
                workers.append(child)
        except psutil.Error:
            continue
    return workers


def stop(run: Run, timeout_s: float = STOP_TIMEOUT_S) -> str:
    """Ask the ranks to save and stop (SIGTERM); after timeout_s, kill whatever is left."""
    with queue.ledger_lock(run.path.parent):  # so that its supervisor cannot claim the GPUs meanwhile
        status = run.read_status()
        if run_state(run) == "queued":  # nothing started yet: end the waiting supervisor, and say so
            processes.signal_group(status["pgid"], signal.SIGKILL)
            run.write_status(state="stopped")
            latest = run.latest_checkpoint()
            EventWriter(run.events_path).emit("stopped", step=None, checkpoint=str(latest) if latest else None)
            return f"run {run.name} was queued; taken out of the queue"
    if run_state(run) != "running":
        return f"run {run.name} is not running ({run_state(run)})"
    pid, pgid = status["pid"], status["pgid"]
    run.write_status(state="stopping")
    workers = worker_processes(pid)
    for proc in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    if not workers:
        # Still starting up (no rank yet): nothing to save, end the whole group.
        processes.signal_group(pgid, signal.SIGTERM)
    created = status.get("create_time")
    deadline = time.time() + timeout_s
    while time.time() < deadline and processes.alive(pid, created):
        time.sleep(0.5)
    if processes.alive(pid, created) or processes.group_members(pgid, created):
        processes.signal_group(pgid, signal.SIGKILL)
        time.sleep(0.5)
    state = run_state(run)
    if state == "stopping":
        run.write_status(state="stopped")
    checkpoint = run.latest_checkpoint()
    return (f"run {run.name} stopped; last checkpoint: {checkpoint.name if checkpoint else 'none yet'}")


def follow(run: Run, poll_s: float = 1.0) -> int:
    """Print progress until the run ends: 0 done, 1 failed, 3 stopped. Ctrl-C stops the run."""
    from tqdm import tqdm

    reader = EventReader(run.events_path)
    bar = None
    if run_state(run) == "queued":
        print(f"{queue.place(run)}; it starts by itself when they are free (Ctrl-C takes it out of the queue)",
              file=sys.stderr)
    try:
        while True:
            for event in reader.poll():
                if event["type"] == "start":
                    bar = tqdm(total=event["total_steps"], initial=event["resumed_from_step"], unit="step")
                    print(f"training {event['model']} on {event['world_size']} rank(s), "
                          f"{event['trainable_params']:,} trainable parameters", file=sys.stderr)
                    print(f"data: {event['data_summary']}", file=sys.stderr)
                elif event["type"] == "step" and bar is not None:
                    bar.n = event["step"]
                    bar.set_postfix(loss=f"{event['loss']:.4f}", tok_s=event["tokens_per_s"])
                elif event["type"] == "checkpoint":
                    tqdm.write(f"checkpoint: {event['path']}")
            final = reader.final()
            state = run_state(run)
            if final is not None and state not in ("queued", "running", "stopping"):
                break
            if final is None and state in ("failed", "stopped", "finished"):
                reader.poll()
                final = reader.final() or {"type": "error", "message": f"run ended ({state})"}
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print("\nstopping (the run saves a checkpoint first)...", file=sys.stderr)
        print(stop(run), file=sys.stderr)
        reader.poll()
        final = reader.final() or {"type": "stopped"}
    if bar is not None:
        bar.close()
    if final["type"] == "done":
        print(f"done: adapter in {final['adapter_path']}")
        return 0
    if final["type"] == "stopped":
        print(f"stopped at step {final.get('step')}; resume with: python -m gptoss_webui train --resume "
              f"{run.path}")
        return 3
    print(f"failed: {final.get('message')}", file=sys.stderr)
    if final.get("log_tail"):
        print(final["log_tail"][-2000:], file=sys.stderr)
    return 1



