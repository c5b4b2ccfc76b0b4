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
from gptoss_webui.mxfp4 import is_mxfp4_config
from gptoss_webui.serve.plan import (
    PlanError,
    adapter_rank,
    check_adapter_base,
    check_model,
    engine_is_cpu,
    lora_support,
    touches_experts,
)

if TYPE_CHECKING:
    from gptoss_webui.serve.state import EngineInfo

AdapterMode = Literal["auto", "hotload", "merge"]
Served = Literal["hotload", "merge"]

# Decode tokens/s (vLLM's own time per output token, the first excluded) on one H200, vLLM 0.26, the random-weight
# MXFP4 20b, requests of 128 + 128 tokens, r=8 adapters, one host (bench/README.md, 2026-12-02, eleventh session):
#   concurrent requests                          1      16      64
#   base (the LoRA engine, no adapter)         344   2,642   7,718
#   hot-loaded attention LoRA                  275   2,346   7,359
#   hot-loaded attention + experts 7/15/23     260   2,255   7,031
#   merged attention + experts (bf16 experts)  321   1,625   4,792
# Merged, an MXFP4 model's experts are stored in bf16 (vLLM 0.26 quantizes every MoE layer of the model alike, so the
# layers the adapter leaves alone cannot stay MXFP4) and run vLLM's unquantized MoE kernels: faster than hot-loaded
# LoRA for one request, slower at 16 and 64. Between 1 and 16 it was not measured; there `auto` hot-loads, which costs
# no 39 GiB copy and no merge, and keeps Chat's base-vs-adapter compare.
MXFP4_HOTLOAD_FROM = 2
MXFP4_MERGED_AT_1 = round(321 / 260, 2)  # the merged model over hot-loaded expert LoRA, 1 request
MXFP4_MERGED_AT_16 = round(1625 / 2255, 2)  # the same at 16
# An adapter on attention alone leaves the experts untouched, so its merge keeps the base's MXFP4 experts and decodes at
# the base's speed: 0.99-1.03x the LoRA-off engine's output tokens/s at 1-64 requests (sixth session, one host), which
# is itself a little faster than the LoRA engine's base row. So merged over hot-loaded is at least the base row over
# the hot-loaded attention row of the table above, and `auto` merges such an adapter on an MXFP4 base.
MXFP4_ATTENTION_MERGED = (round(344 / 275, 2), round(7718 / 7359, 2))  # the base over hot-loaded, at 1 and 64
# A bf16 base: hot-loaded expert LoRA decoded 728 output tokens/s against the base's 1,564 at 64 requests (H100, the
# bf16 20b, vLLM 0.26, 2026-11-28), and a merged model is the base's architecture in the base's dtype, so `auto`
# merges from BF16_MERGE_FROM expected requests on.
BF16_EXPERT_LORA_SPEED = 0.47
BF16_MERGE_FROM = 16


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
    engine cannot run LoRA for the architecture); auto merges where it cannot, and on a GPU chooses what was measured
    faster (the constants above): attention-only LoRA on an MXFP4 base merged; expert LoRA the faster way at the
    expected concurrency, merged only if the merged model fits."""
    experts = touches_experts(adapter_dir)  # also: is it an adapter at all
    can_lora, why = lora_support(model_cfg, cpu)
    if requested == "hotload":
        if not can_lora:
            raise PlanError(say("serving.policy.no_hotload", why=why))
        return "hotload", say("serving.policy.hotload_requested")
    if requested == "merge":
        return "merge", say("serving.policy.merge_requested")
    if not can_lora:
        return "merge", say("serving.policy.merge_instead", why=why)
    if cpu:
        return "hotload", why
    if not experts:
        if not is_mxfp4_config(model_cfg):
            return "hotload", why
        at_1, at_64 = MXFP4_ATTENTION_MERGED  # the merged copy keeps the MXFP4 experts: it fits where the base does
        return "merge", say("serving.policy.mxfp4_attention_merge", at_1=at_1, at_64=at_64)
    concurrency = config.max_concurrency
    if is_mxfp4_config(model_cfg):
        if concurrency >= MXFP4_HOTLOAD_FROM:
            return "hotload", say("serving.policy.mxfp4_hotload", ratio=MXFP4_MERGED_AT_16, concurrency=concurrency,
                                  hotload_from=MXFP4_HOTLOAD_FROM)
        pays = say("serving.policy.mxfp4_merge_pays", ratio=MXFP4_MERGED_AT_1, concurrency=concurrency,
                   hotload_from=MXFP4_HOTLOAD_FROM)
    elif concurrency < BF16_MERGE_FROM:
        return "hotload", say("serving.policy.hotload_low_concurrency", concurrency=concurrency,
                              merge_from=BF16_MERGE_FROM)
    else:
        pays = say("serving.policy.bf16_merge_pays", speed=BF16_EXPERT_LORA_SPEED, concurrency=concurrency,
                   merge_from=BF16_MERGE_FROM)
    if too_large := merge_too_large(model, config, gpus()):
        return "hotload", say("serving.policy.hotload_although", pays=pays, too_large=too_large)
    return "merge", say("serving.policy.merging", pays=pays)


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
