"""Loading the base model for training: which form the frozen weights take, and the MXFP4-resident loader.

`train.base_weights: mxfp4` keeps an MXFP4 checkpoint's experts as the checkpoint stores them (blocks + scales,
4.25 bits a weight) and `train/experts.py` decodes them a layer at a time; gpt-oss-20b then holds 12.8 GiB of
weights instead of 38.96. `bf16` decodes every expert once at load, with the same decode (on the GPU when there is
one). transformers' own Mxfp4Config(dequantize=True) is not used: it skips zero.Init, and 5.19 saves what it
decoded under broken names.
`mxfp4.choose_base_weights` is the one place that decides, for the worker and the estimator alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptoss_webui.config import ConfigError, TrainConfig
from gptoss_webui.mxfp4 import EXPERT_WEIGHTS, check_scales, choose_base_weights, is_mxfp4_config


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
        model = assemble_model(model_config, tensors, dtype, attention, source=str(folder))
    return model, mode, note


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
    for file in _safetensors_files(folder):
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


def decode_expert_tensors(tensors: dict, dtype) -> dict:
    """Checkpoint tensors with every MXFP4 `<weight>_blocks/_scales` pair replaced by `<weight>` in `dtype`, in
    transformers' [E, in, out] layout (what Mxfp4Config(dequantize=True) holds). The decode runs on the GPU where
    there is one (a CPU core takes about 0.12 s per 20b expert), and the decoded weights stay there, where training
    needs them: not 39 GiB copied back to the CPU and up again. Changes and returns `tensors`."""
    from gptoss_webui.mxfp4 import decode

    for key in [k for k in tensors if k.endswith("_blocks")]:
        name = key.removesuffix("_blocks")
        codes, scales = tensors.pop(key), tensors.pop(f"{name}_scales")
        check_scales(f"{name}_scales", scales)
        where = "cuda" if torch.cuda.is_available() else codes.device
        tensors[name] = decode(codes.to(where), scales.to(where), dtype).transpose(1, 2).contiguous()
    return tensors


def assemble_model(model_config, tensors: dict, dtype, attention: str, source: str = "checkpoint",
                   grouped: bool = True):
    """A gpt-oss model from checkpoint-named tensors. grouped: every experts module a GroupedExperts, over
    MXFP4 `<weight>_blocks/_scales` where the tensors hold them, else over bf16 `<weight>` [E, in, out];
    not grouped (the merge): transformers' own experts, which need the bf16 `<weight>` tensors.

    The skeleton is built on the meta device (no memory); each tensor then becomes its parameter in `dtype`
    (codes and scales stay uint8), on the device it came on. `tensors` is consumed.
    """
    import copy

    from transformers import AutoModelForCausalLM

    from gptoss_webui.train.experts import GroupedExperts

    config = copy.deepcopy(model_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp.experts."
        own = {key.removeprefix(prefix): tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        if grouped and (f"{EXPERT_WEIGHTS[0]}_blocks" in own or f"{EXPERT_WEIGHTS[0]}_scales" in own):
            _check_layer(prefix, own, layer.mlp.experts)
            for name in EXPERT_WEIGHTS:
                own[f"{name}_bias"] = own[f"{name}_bias"].to(dtype)
            layer.mlp.experts = GroupedExperts.from_mxfp4(layer.mlp.experts, own)
            continue
        tensors.update({prefix + key: value for key, value in own.items()})  # loaded as plain parameters below
    missing = []
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        if name not in tensors:
            missing.append(name)
            continue
        owner, leaf = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        value = tensors.pop(name)
        if tuple(value.shape) != tuple(param.shape):
            raise ConfigError(f"{source}: {name} has shape {list(value.shape)}, the config says {list(param.shape)}")
        owner.register_parameter(leaf, nn.Parameter(value.to(dtype), requires_grad=False))
    if missing:
        raise ConfigError(f"{source} lacks {len(missing)} weight(s) the config needs, e.g. {missing[:3]}")
    if grouped:
        for layer in model.model.layers:
            if not isinstance(layer.mlp.experts, GroupedExperts):
                layer.mlp.experts = GroupedExperts.from_transformers(layer.mlp.experts)
    # Buffers computed at construction (rotary frequencies) are rebuilt off the meta device.
    with model.model.embed_tokens.weight.device:
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    leftover = [name for name, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"buffers left on the meta device after loading: {leftover[:3]}")
    return model


def _check_layer(prefix: str, tensors: dict, experts) -> None:
    """The experts of one layer: all six tensors, uint8 codes of the config's shape."""
    for name in EXPERT_WEIGHTS:
        blocks, scales = tensors.get(f"{name}_blocks"), tensors.get(f"{name}_scales")
        if blocks is None or scales is None or f"{name}_bias" not in tensors:
            raise ConfigError(f"MXFP4 checkpoint lacks {prefix}{name}_blocks/_scales/_bias "
                              f"(it has: {', '.join(sorted(tensors)) or 'nothing'} there)")
        want = mxfp4_blocks_shape(experts.num_experts, experts.hidden_size, experts.intermediate_size, name)
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != want or tuple(scales.shape) != want[:3]:
            raise ConfigError(f"{prefix}{name}_blocks/_scales are {blocks.dtype} {list(blocks.shape)} / "
                              f"{list(scales.shape)}; MXFP4 for this config is uint8 {list(want)} / {list(want[:3])}")


def mxfp4_blocks_shape(experts: int, hidden: int, intermediate: int, weight: str) -> tuple[int, int, int, int]:
    """[E, rows, cols/32, 16] of a fused expert weight's codes (its scales drop the last dimension)."""
    rows, cols = (2 * intermediate, hidden) if weight == "gate_up_proj" else (hidden, intermediate)
    return experts, rows, cols // 32, 16


def check_mxfp4_checkpoint(folder: Path, model_config) -> None:
    """Every MXFP4 code and scale tensor of a checkpoint against the config's shapes, and every scale for NaN,
    before any weight loads: a damaged checkpoint is refused whether its experts then stay MXFP4 or go bf16.
    Shapes come from the files' headers; only the scales (1/16 of the codes) are read."""
    from safetensors import safe_open

    for file in _safetensors_files(folder):
        with safe_open(str(folder / file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                weight, _, part = key.rsplit(".", 1)[-1].rpartition("_")
                if part not in ("blocks", "scales") or weight not in EXPERT_WEIGHTS:
                    continue
                want = mxfp4_blocks_shape(model_config.num_local_experts, model_config.hidden_size,
                                          model_config.intermediate_size, weight)[:4 if part == "blocks" else 3]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != want:
                    raise ConfigError(f"{key} is {list(shape)}; MXFP4 for this config is {list(want)}: the "
                                      "checkpoint does not match its config.json")
                if part == "scales":
                    check_scales(key, f.get_tensor(key))


def _safetensors_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} holds no .safetensors weights")
    return files


def read_safetensors(folder: Path) -> dict:
    """Every tensor of a (possibly sharded) safetensors checkpoint, by name, on the CPU."""
    from safetensors.torch import load_file

    tensors: dict = {}
    for name in _safetensors_files(folder):
        tensors.update(load_file(str(folder / name)))
    return tensors


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
