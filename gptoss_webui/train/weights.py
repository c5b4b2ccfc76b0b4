"""Loading the base model for training: which form the frozen weights take, and the MXFP4-resident loader.

`train.base_weights: mxfp4` keeps an MXFP4 checkpoint's experts as the checkpoint stores them (blocks + scales,
4.25 bits a weight) and `train/experts.py` decodes them a layer at a time; gpt-oss-20b then holds 12.8 GiB of
weights instead of 38.96. `bf16` decodes every expert once at load, with the same decode (on the GPU when there is
one). transformers' own Mxfp4Config(dequantize=True) is not used: it skips zero.Init, and 5.19 saves what it
decoded under broken names.
`mxfp4.choose_base_weights` is the one place that decides, for the worker and the estimator alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptoss_webui.checkpoint import (
    assemble_model,
    check_mxfp4_checkpoint,
    decode_expert_tensors,
    read_safetensors,
    safetensors_files,
)
from gptoss_webui.config import ConfigError, TrainConfig
from gptoss_webui.mxfp4 import choose_base_weights, is_mxfp4_config


def load_base_model(model_path: str, model_config, cfg: TrainConfig, attention: str) -> tuple[Any, str, str]:
    """(model on the CPU with use_cache off, the base weights chosen, the reason for a fallback or "")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = model_config or AutoConfig.from_pretrained(model_path)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
    checkpoint_mxfp4 = is_mxfp4_config(model_config)
    if checkpoint_mxfp4:
        check_mxfp4_checkpoint(Path(model_path), model_config)
    mode, note = choose_base_weights(cfg, checkpoint_mxfp4)
    if mode == "auto":  # the estimator decides, as it did before the launch
        from gptoss_webui.train.memory import estimate_for_recipe

        mode = estimate_for_recipe(cfg, search_fix=False).base_weights
    folder = Path(model_path)
    if not checkpoint_mxfp4:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attention,
                                                     use_cache=False)
    elif cfg.deepspeed.enabled and cfg.deepspeed.stage == 3:
        model = load_decoded_under_zero3(folder, model_config, dtype, attention)
    else:  # the same loader either way; bf16 decodes every expert once, here
        tensors = read_safetensors(folder)
        if mode == "bf16":
            decode_expert_tensors(tensors, dtype)
        model = assemble_for_training(model_config, tensors, dtype, attention, source=str(folder))
    return model, mode, str(note) if note else ""  # the log and the start event are English


def load_decoded_under_zero3(folder: Path, model_config, dtype, attention: str):
    """ZeRO-3 over an MXFP4 checkpoint. transformers skips zero.Init for quantized checkpoints, so every rank would
    hold the whole model decoded to bf16 (and DeepSpeed would then copy it to each GPU). Here the model is built
    under zero.Init, partitioned as it is created, and each weight is filled in turn from the checkpoint by rank 0
    (experts decoded on the way) while it is gathered; the other ranks read nothing."""
    import copy

    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import deepspeed_config

    from gptoss_webui.mxfp4 import decode

    config = copy.deepcopy(model_config)
    del config.quantization_config
    config.use_cache = False
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    leader = not dist.is_initialized() or dist.get_rank() == 0
    where = {}
    for file in safetensors_files(folder):
        with safe_open(str(folder / file), "pt") as f:
            where.update(dict.fromkeys(f.keys(), file))  # noqa: SIM118 (a safetensors handle is not iterable)

    def read(name: str) -> torch.Tensor:
        with safe_open(str(folder / where[name]), "pt") as f:
            return f.get_tensor(name)

    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if not leader:
                continue
            if name in where:
                value = read(name)
            elif f"{name}_blocks" in where:  # [E, out, in] codes -> transformers' [E, in, out], decoded where it goes
                codes, scales = (read(f"{name}{part}").to(param.device) for part in ("_blocks", "_scales"))
                value = decode(codes, scales, dtype).transpose(1, 2)
            else:
                raise ConfigError(f"{folder} lacks {name} (nor {name}_blocks/_scales)")
            param.data.copy_(value.to(param.dtype))
    return model


def assemble_for_training(model_config, tensors: dict, dtype, attention: str, source: str = "checkpoint"):
    """checkpoint.assemble_model with every experts module a GroupedExperts (train/experts.py): over the MXFP4
    codes where the tensors hold them, else over bf16 weights."""
    from gptoss_webui.train.experts import GroupedExperts

    model = assemble_model(model_config, tensors, dtype, attention, source=source, experts_class=GroupedExperts)
    model.config.use_cache = False  # training runs whole sequences; the config a merge writes keeps the base's
    return model


class CpuEmbedding(nn.Module):
    """Frozen input embeddings kept in CPU memory: a row lookup per token, then a copy of [tokens, hidden] to the
    GPU. gpt-oss's 201k x 2880 table is 1.08 GiB of bf16 that the GPU would hold only for that lookup. The table is
    a plain attribute, not a parameter or buffer, so that moving the model to the GPU leaves it where it is."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.table = embedding.weight.detach().to("cpu")
        self.padding_idx = embedding.padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids.cpu(), self.table, padding_idx=self.padding_idx)
        return rows.to(input_ids.device, non_blocking=True)
