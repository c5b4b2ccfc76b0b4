"""Reading a checkpoint in gpt-oss's released layout: safetensors shards, the MXFP4 expert codes checked against the
config and decoded, and a model assembled from the tensors without a second copy in memory.

Training (train/weights.py) assembles with its own experts module (`experts_class`, train/experts.GroupedExperts)
over the MXFP4 codes or bf16 weights; the merge (serve/merge.py) assembles transformers' own experts from bf16
weights decoded here, with the same decode.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from gptoss_webui.config import ConfigError
from gptoss_webui.mxfp4 import EXPERT_WEIGHTS, check_scales


def decode_expert_tensors(tensors: dict, dtype, keep_on: str | None = None) -> dict:
    """Checkpoint tensors with every MXFP4 `<weight>_blocks/_scales` pair replaced by `<weight>` in `dtype`, in
    transformers' [E, in, out] layout (what Mxfp4Config(dequantize=True) holds). The decode runs on the GPU where
    there is one (a CPU core takes about 0.12 s per 20b expert), and the decoded weights stay there, where training
    needs them: not 39 GiB copied back to the CPU and up again. `keep_on`: move each decoded weight there instead
    (the merge, when the model does not fit the GPU). Changes and returns `tensors`."""
    from gptoss_webui.mxfp4 import decode

    for key in [k for k in tensors if k.endswith("_blocks")]:
        name = key.removesuffix("_blocks")
        codes, scales = tensors.pop(key), tensors.pop(f"{name}_scales")
        check_scales(f"{name}_scales", scales)
        where = "cuda" if torch.cuda.is_available() else codes.device
        weight = decode(codes.to(where), scales.to(where), dtype).transpose(1, 2).contiguous()
        tensors[name] = weight if keep_on is None else weight.to(keep_on)
    return tensors


def assemble_model(model_config, tensors: dict, dtype, attention: str, source: str = "checkpoint",
                   experts_class=None):
    """A gpt-oss model from checkpoint-named tensors. With `experts_class` (a class with `from_mxfp4(experts,
    tensors)` and `from_transformers(experts)`), every experts module becomes one, over MXFP4
    `<weight>_blocks/_scales` where the tensors hold them, else over bf16 `<weight>` [E, in, out]; without it (the
    merge), transformers' own experts, which need the bf16 `<weight>` tensors.

    The skeleton is built on the meta device (no memory); each tensor then becomes its parameter in `dtype`
    (codes and scales stay uint8), on the device it came on. `tensors` is consumed.
    """
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp.experts."
        own = {key.removeprefix(prefix): tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        if experts_class and (f"{EXPERT_WEIGHTS[0]}_blocks" in own or f"{EXPERT_WEIGHTS[0]}_scales" in own):
            _check_layer(prefix, own, layer.mlp.experts)
            for name in EXPERT_WEIGHTS:
                own[f"{name}_bias"] = own[f"{name}_bias"].to(dtype)
            layer.mlp.experts = experts_class.from_mxfp4(layer.mlp.experts, own)
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
    if experts_class:
        for layer in model.model.layers:
            if not isinstance(layer.mlp.experts, experts_class):
                layer.mlp.experts = experts_class.from_transformers(layer.mlp.experts)
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

    for file in safetensors_files(folder):
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


def safetensors_files(folder: Path) -> list[str]:
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
    for name in safetensors_files(folder):
        tensors.update(load_file(str(folder / name)))
    return tensors
