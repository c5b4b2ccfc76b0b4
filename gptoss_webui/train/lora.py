"""Which LoRA targets a model offers, and LoRA put on the chosen ones.

Attention projections are nn.Linear modules: peft's `target_modules`. gpt-oss experts are fused 3-D weights
(mlp.experts.gate_up_proj / down_proj): `train/experts.py` trains their LoRA as low-rank products and keeps it in
peft's `target_parameters` layout, so the saved adapter is what peft and vLLM load. That layout refuses dropout,
which LoraConfig in gptoss_webui.config already checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from gptoss_webui.config import ConfigError, LoraConfig
from gptoss_webui.messages import say
from gptoss_webui.mxfp4 import EXPERT_WEIGHTS

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class LoraTargetError(ConfigError):
    """An unknown LoRA target, with the valid names listed."""


@dataclass(frozen=True)
class Targets:
    modules: list[str]  # short names of nn.Linear modules, e.g. q_proj
    expert_parameters: dict[str, list[str]]  # short name -> full parameter names, e.g. gate_up_proj -> [...]
    layers: int


def is_experts(module: nn.Module) -> bool:
    """transformers' GptOssExperts, or ours that replaced it."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from gptoss_webui.train.experts import GroupedExperts

    return isinstance(module, (GptOssExperts, GroupedExperts))


def find_targets(model: nn.Module) -> Targets:
    linear, experts, layers = set(), {}, set()
    for name, mod in model.named_modules():
        if m := _LAYER.search(name + "."):
            layers.add(int(m.group(1)))
        if isinstance(mod, nn.Linear) and "lm_head" not in name:
            linear.add(name.rsplit(".", 1)[-1])
        elif is_experts(mod):
            for weight in EXPERT_WEIGHTS:
                experts.setdefault(weight, []).append(f"{name}.{weight}")
    return Targets(sorted(linear), experts, len(layers))


def build_peft_config(cfg: LoraConfig, model: nn.Module) -> tuple[Any, list[str]]:
    """peft's LoraConfig for the attention modules, and the full names of the expert weights to adapt."""
    from peft import LoraConfig as PeftLoraConfig

    targets = find_targets(model)
    unknown = [m for m in cfg.target_modules if m not in targets.modules]
    if unknown:
        raise LoraTargetError(say("lora.unknown_modules", unknown=unknown,
                                  modules=", ".join(targets.modules) or say("lora.none")))
    expert_names = _expert_parameter_names(cfg, targets)
    if not cfg.target_modules and not expert_names:
        raise LoraTargetError(say("lora.nothing"))
    if not cfg.target_modules:
        raise LoraTargetError(say("lora.no_modules", modules=", ".join(targets.modules) or say("lora.none_here")))
    peft_config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    return peft_config, expert_names


def apply_lora(model: nn.Module, cfg: LoraConfig):
    """The PeftModel to train: peft LoRA on the attention modules, `train/experts.py` LoRA on the chosen experts
    (every layer's experts become GroupedExperts), recorded as peft `target_parameters` for the saved adapter."""
    from peft import get_peft_model

    from gptoss_webui.train.experts import GroupedExperts, attach_expert_lora

    for name, mod in list(model.named_modules()):
        if is_experts(mod) and not isinstance(mod, GroupedExperts):
            model.get_submodule(name.rsplit(".", 1)[0]).experts = GroupedExperts.from_transformers(mod)
    peft_config, expert_names = build_peft_config(cfg, model)
    peft_model = get_peft_model(model, peft_config)
    by_module: dict[str, list[str]] = {}
    for full in expert_names:
        module_name, weight = full.rsplit(".", 1)
        by_module.setdefault(module_name, []).append(weight)
    base = peft_model.get_base_model()
    for module_name, weights in by_module.items():
        parent = base.get_submodule(module_name.rsplit(".", 1)[0])
        parent.experts = attach_expert_lora(parent.experts, weights, cfg.r, cfg.alpha)
    peft_model.peft_config["default"].target_parameters = expert_names or None
    return peft_model


def _expert_parameter_names(cfg: LoraConfig, targets: Targets) -> list[str]:
    if not cfg.expert_parameters or cfg.expert_layers == []:
        return []
    if not targets.expert_parameters:
        raise LoraTargetError(say("lora.no_experts", parameters=cfg.expert_parameters))
    unknown = [p for p in cfg.expert_parameters if p not in targets.expert_parameters]
    if unknown:
        raise LoraTargetError(say("lora.unknown_experts", unknown=unknown,
                                  names=", ".join(sorted(targets.expert_parameters))))
    if cfg.expert_layers != "all":
        bad = [i for i in cfg.expert_layers if not 0 <= i < targets.layers]
        if bad:
            raise LoraTargetError(say("lora.layers_out_of_range", bad=bad, last=targets.layers - 1))
    names = []
    for short in cfg.expert_parameters:
        for full in targets.expert_parameters[short]:
            layer = int(_LAYER.search(full).group(1))
            if cfg.expert_layers == "all" or layer in cfg.expert_layers:
                names.append(full)
    return names
