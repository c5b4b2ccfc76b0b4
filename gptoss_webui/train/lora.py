"""Which LoRA targets a model offers, and the peft LoraConfig for the chosen ones.

Attention projections are nn.Linear modules (peft `target_modules`). gpt-oss experts are fused 3-D
parameters (mlp.experts.gate_up_proj / down_proj), reached with peft's `target_parameters`; that path
refuses dropout, which LoraConfig in gptoss_webui.config already checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from gptoss_webui.config import ConfigError, LoraConfig

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class LoraTargetError(ConfigError):
    """An unknown LoRA target, with the valid names listed."""


@dataclass(frozen=True)
class Targets:
    modules: list[str]  # short names of nn.Linear modules, e.g. q_proj
    expert_parameters: dict[str, list[str]]  # short name -> full parameter names, e.g. gate_up_proj -> [...]
    layers: int


def find_targets(model: nn.Module) -> Targets:
    linear = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                     if isinstance(mod, nn.Linear) and "lm_head" not in name})
    experts: dict[str, list[str]] = {}
    layers = set()
    for name, param in model.named_parameters():
        if m := _LAYER.search(name):
            layers.add(int(m.group(1)))
        if ".experts." in name and param.dim() == 3:
            experts.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return Targets(linear, experts, len(layers))


def build_peft_config(cfg: LoraConfig, model: nn.Module) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    targets = find_targets(model)
    unknown = [m for m in cfg.target_modules if m not in targets.modules]
    if unknown:
        raise LoraTargetError(
            f"unknown LoRA target module(s) {unknown}; this model's linear modules are: "
            f"{', '.join(targets.modules) or '(none)'}")
    target_parameters = _expert_parameter_names(cfg, targets)
    if not cfg.target_modules and not target_parameters:
        raise LoraTargetError("nothing to train: set lora.target_modules and/or lora.expert_parameters")
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        target_parameters=target_parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _expert_parameter_names(cfg: LoraConfig, targets: Targets) -> list[str]:
    if not cfg.expert_parameters or cfg.expert_layers == []:
        return []
    if not targets.expert_parameters:
        raise LoraTargetError(
            f"lora.expert_parameters={cfg.expert_parameters} but this model has no fused expert parameters "
            "(it is not a gpt-oss MoE); set lora.expert_parameters=[]")
    unknown = [p for p in cfg.expert_parameters if p not in targets.expert_parameters]
    if unknown:
        raise LoraTargetError(f"unknown expert parameter(s) {unknown}; this model has: "
                              f"{', '.join(sorted(targets.expert_parameters))}")
    if cfg.expert_layers != "all":
        bad = [i for i in cfg.expert_layers if not 0 <= i < targets.layers]
        if bad:
            raise LoraTargetError(f"lora.expert_layers {bad} out of range: the model has layers "
                                  f"0..{targets.layers - 1}")
    names = []
    for short in cfg.expert_parameters:
        for full in targets.expert_parameters[short]:
            layer = int(_LAYER.search(full).group(1))
            if cfg.expert_layers == "all" or layer in cfg.expert_layers:
                names.append(full)
    return names
