"""How an adapter is served: hot-loaded into the engine (LoRA kernels at run time) or merged into the weights,
and what that asks of the engine running now (load into it, start one, restart it). Decided here only: the
UI (ui/engine_ctl.py), the CLI (serve/command.py) and Engine.start execute what this returns and show its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gptoss_webui.config import ServeConfig
from gptoss_webui.hardware import Gpu, gpus
from gptoss_webui.messages import Message, say
from gptoss_webui.serve.plan import (
    PlanError,
    adapter_rank,
    check_adapter_base,
    check_model,
    engine_is_cpu,
    lora_support,
    read_adapter_config,
)

if TYPE_CHECKING:
    from gptoss_webui.serve.state import EngineInfo

AdapterMode = Literal["auto", "hotload", "merge"]
Served = Literal["hotload", "merge"]

# Measured on an H200 with vLLM 0.26 serving the MXFP4 20b (bench/results/2026-12-01-h200-serve-all.json,
# bench/README.md): at 64 concurrent requests of 128+128 tokens, a hot-loaded r=8 adapter on attention and the experts
# of three layers decoded 2,333 output tokens/s against the base's 3,098 (the H100's bf16 20b: 0.47x). From
# MERGE_FROM_CONCURRENCY expected requests on, `auto` merges such an adapter.
EXPERT_LORA_SPEED = 0.75
EXPERT_LORA_MEASURED_AT = 64
MERGE_FROM_CONCURRENCY = 16


@dataclass(frozen=True)
class AdapterPlan:
    """How the adapters an engine starts with are served."""

    mode: Literal["none", "hotload", "merge"]
    reason: Message  # str() is English


@dataclass(frozen=True)
class Action:
    """What serving one adapter takes, given the engine as it is now."""

    kind: Literal["hotload_running", "start", "restart"]  # load into the running engine / start one / stop, start
    mode: Served  # how the adapter is served
    reason: Message  # one line for the user; str() is English


def choose_mode(model: str, model_cfg: dict, adapter_dir: str | Path, requested: AdapterMode,
                config: ServeConfig, cpu: bool) -> tuple[Served, Message]:
    """How one adapter is served, and why in one line. Explicit modes are kept (hot-load refused where the
    engine cannot run LoRA for the architecture); auto merges where it cannot, and on a GPU merges expert
    LoRA when the expected concurrency is where hot-loaded expert LoRA was measured slow, if the merged
    model fits."""
    experts = bool(read_adapter_config(adapter_dir).get("target_parameters"))  # also: is it an adapter at all
    can_lora, why = lora_support(model_cfg, cpu)
    if requested == "hotload":
        if not can_lora:
            raise PlanError(say("serving.policy.no_hotload", why=why))
        return "hotload", say("serving.policy.hotload_requested")
    if requested == "merge":
        return "merge", say("serving.policy.merge_requested")
    if not can_lora:
        return "merge", say("serving.policy.merge_instead", why=why)
    if cpu or not experts:
        return "hotload", why
    concurrency = config.max_concurrency
    if concurrency < MERGE_FROM_CONCURRENCY:
        return "hotload", say("serving.policy.hotload_low_concurrency", concurrency=concurrency,
                              merge_from=MERGE_FROM_CONCURRENCY)
    slow = say("serving.policy.slow", speed=EXPERT_LORA_SPEED, at=EXPERT_LORA_MEASURED_AT)
    if too_large := merge_too_large(model, config, gpus()):
        return "hotload", say("serving.policy.hotload_although", slow=slow, too_large=too_large)
    return "merge", say("serving.policy.merging", slow=slow, concurrency=concurrency, merge_from=MERGE_FROM_CONCURRENCY)


def merge_too_large(model: str, config: ServeConfig, found: list[Gpu]) -> Message | str:
    """Why a merge of expert LoRA into `model` (experts in bf16) cannot be served on these GPUs; '' when it
    can, or when the sizes are not known here."""
    from gptoss_webui.architecture import ArchitectureError, resolve_architecture

    if not found:
        return ""
    try:
        merged = resolve_architecture(model).total_params * 2 / 2**30
    except ArchitectureError:
        return ""
    tp = config.tensor_parallel_size
    room = min(g.total_gib for g in found) * tp * config.gpu_memory_utilization
    if merged <= room:
        return ""
    if tp == 1:
        return say("serving.policy.merged_too_large_1", merged=merged, room=room)
    return say("serving.policy.merged_too_large", merged=merged, room=room, tp=tp)


def plan_adapters(model: str, model_cfg: dict, adapters: dict[str, str], requested: AdapterMode,
                  config: ServeConfig, cpu: bool) -> AdapterPlan:
    """How the adapters an engine starts with are served: one rule per adapter (choose_mode); a merged
    model holds one adapter, so several are hot-loaded together where the engine can."""
    if not adapters:
        return AdapterPlan("none", say("serving.policy.no_adapter"))
    chosen = {name: choose_mode(model, model_cfg, path, requested, config, cpu) for name, path in adapters.items()}
    merged = [name for name, (mode, _) in chosen.items() if mode == "merge"]
    if not merged:
        return AdapterPlan("hotload", next(iter(chosen.values()))[1])
    if len(adapters) == 1:
        return AdapterPlan("merge", chosen[merged[0]][1])
    if requested == "merge" or not lora_support(model_cfg, cpu)[0]:
        raise PlanError(say("serving.policy.merge_one", adapters=", ".join(adapters)))
    return AdapterPlan("hotload", say("serving.policy.together", count=len(adapters), name=merged[0],
                                      why=chosen[merged[0]][1]))


def serving_action(info: EngineInfo, config: ServeConfig, name: str, adapter: str | Path,
                   requested: AdapterMode, cpu: bool | None = None) -> Action:
    """What serving `adapter` as `name` on config.model takes, with the engine in state `info`."""
    from gptoss_webui.sources import resolve_model

    cpu = engine_is_cpu() if cpu is None else cpu
    model = resolve_model(config.model)
    model_cfg = check_model(model, cpu)
    check_adapter_base(model, adapter)
    mode, why = choose_mode(model, model_cfg, adapter, requested, config, cpu)
    if not info.live:
        return Action("start", mode, why)
    if mode == "merge":
        return Action("restart", mode, say("serving.policy.restart_merged", why=why))
    blocker = _blocks_hotload(info, config, model, adapter)
    if blocker:
        return Action("restart", mode, say("serving.policy.restart_with", why=why, blocker=blocker))
    return Action("hotload_running", mode, say("serving.policy.load_running", why=why))


def _blocks_hotload(info: EngineInfo, config: ServeConfig, model: str, adapter: str | Path) -> Message | str:
    """Why the running engine cannot take the adapter as it is ('' when it can)."""
    if info.state != "running":
        return say("serving.policy.blocker.state", state=info.state)
    if config.model != info.model_spec and model != info.model:
        return say("serving.policy.blocker.other_model", served=info.served_name, model=config.model)
    if info.merged_from:
        return say("serving.policy.blocker.merged", names=", ".join(info.merged_from))
    if not info.lora_enabled:
        return say("serving.policy.blocker.no_lora", note=info.lora_note)
    rank = adapter_rank(adapter)
    if rank > info.max_lora_rank:
        return say("serving.policy.blocker.rank", rank=rank, max_rank=info.max_lora_rank)
    return ""
