"""MXFP4, the format of gpt-oss's released expert weights: decode, check, and random weights in that layout.

A checkpoint stores each fused expert weight as two uint8 tensors (../shared/GPT-OSS-FACTS.md):
`<name>_blocks` [E, rows, cols/32, 16], two FP4 (e2m1) codes a byte, low nibble first, and `<name>_scales`
[E, rows, cols/32], one E8M0 exponent (bias 127) per block of 32 values. rows are the output features
(gate_up: 2 x intermediate, interleaved gate/up; down: hidden) and cols the input features. Decoding is exact
in bf16 and fp32, so training on decoded weights trains on the released weights.

`decode` gives [E, rows, cols] (row-major: what a grouped matmul reads as the transposed [E, cols, rows]
weight); transformers.integrations.mxfp4.convert_moe_packed_tensors is the reference (tests/test_mxfp4.py), and
`mxfp4_triton` the GPU kernel.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

from gptoss_webui.messages import Message, say

if TYPE_CHECKING:  # torch is imported where it is used: the estimator reads this module's constants without it
    import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
SCALE_NAN = 255  # E8M0 reserves 0xFF for NaN: a checkpoint holding it is corrupt
BLOCK = 32  # values per scale
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # gpt-oss's fused expert parameters
# Bytes per weight kept resident: half a byte of codes plus one scale byte per 32 weights.
BYTES_PER_WEIGHT = 0.5 + 1 / BLOCK


def is_mxfp4_config(config: Any) -> bool:
    """Whether a config (dict or transformers config) says the checkpoint stores MXFP4 experts."""
    quant = config.get("quantization_config") if isinstance(config, dict) else \
        getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return method == "mxfp4"


def choose_base_weights(cfg, checkpoint_mxfp4: bool) -> tuple[str, Message | None]:
    """For a TrainConfig: ("mxfp4" | "bf16" | "auto", why, where mxfp4 was asked for and cannot be had, else
    None). "auto" means both are possible: the estimator picks by what fits (memory.estimate)."""
    wanted = cfg.base_weights
    if wanted == "bf16":
        return "bf16", None
    if not checkpoint_mxfp4:
        why = say("mxfp4.not_stored", model=cfg.model, precision=cfg.precision)
        return "bf16", why if wanted == "mxfp4" else None
    if cfg.deepspeed.enabled and cfg.deepspeed.stage == 3:
        return "bf16", say("mxfp4.zero3") if wanted == "mxfp4" else None
    return wanted, None


def _decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The decode in torch ops: on the CPU, and the reference the GPU kernel is tested against."""
    import torch

    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int32)  # low nibble first
    values = lut[codes].flatten(-3)  # [..., rows, cols]
    power = torch.exp2((scales.to(torch.int32) - SCALE_BIAS).to(torch.float32)).to(dtype)
    return (values.unflatten(-1, (-1, BLOCK)) * power[..., None]).flatten(-2)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, again: bool = False) -> torch.Tensor:
    """[E, rows, cols/32, 16] codes + [E, rows, cols/32] scales -> [E, rows, cols] weights in `dtype`.

    On a GPU one Triton kernel (mxfp4_triton: one read of the codes, one write of the weights, also inside a
    compiled layer); bf16 holds every decoded value exactly, so other dtypes convert from it. `again`: a
    backward's decode of codes the forward decoded too, under another op name that a compiled layer does not
    merge with the forward's (mxfp4_triton). On the CPU, or without Triton, torch ops one expert at a time, which
    bounds their temporaries to one expert's size.
    """
    import torch

    if blocks.is_cuda and (_gpu_kernels is not None or load_gpu_kernel()):
        # Not _gpu_kernels[again]: torch 2.11's dynamo cannot index a tuple with a bool, and it then ran every
        # compiled layer's experts eagerly (H200, 2026-12-01: 12,103 against 13,333 tokens/s; bench/README.md).
        weights = (_gpu_kernels[1] if again else _gpu_kernels[0])(blocks, scales)
        return weights if dtype == torch.bfloat16 else weights.to(dtype)
    if blocks.dim() < 4 or torch.compiler.is_compiling():  # a compiled graph fuses the ops instead
        return _decode(blocks, scales, dtype)
    return torch.stack([_decode(b, s, dtype) for b, s in zip(blocks, scales, strict=True)])


_gpu_kernels = None  # mxfp4_triton's (decode_bf16, decode_bf16_again), once load_gpu_kernel found Triton


def load_gpu_kernel() -> bool:
    """Import the Triton decode, if Triton is there. Models call this when they are built, outside any compiled
    region: a custom op cannot be registered while torch.compile traces. Without Triton the GPU decodes with
    torch ops, an expert at a time (slower), and says so once."""
    global _gpu_kernels
    from torch.utils._triton import has_triton

    if _gpu_kernels is None and has_triton():
        from gptoss_webui.mxfp4_triton import decode_bf16, decode_bf16_again

        _gpu_kernels = (decode_bf16, decode_bf16_again)
    elif _gpu_kernels is None:
        _say_no_triton()
    return _gpu_kernels is not None


@functools.cache
def _say_no_triton() -> None:
    import sys

    print("note: Triton is missing, so MXFP4 experts are decoded without a fused kernel (slower steps)",
          file=sys.stderr, flush=True)


def check_scales(name: str, scales: torch.Tensor) -> None:
    """Refuse scales that decode to NaN (0xFF): a damaged or wrongly converted checkpoint."""
    bad = int((scales == SCALE_NAN).sum())
    if bad:
        from gptoss_webui.config import ConfigError

        raise ConfigError(f"corrupt MXFP4 checkpoint: {name} holds {bad:,} NaN scales (0xFF); re-download or "
                          "re-convert the model before training on it")


def random_experts(experts: int, rows: int, cols: int, *, generator: torch.Generator | None = None,
                   device: str = "cpu", std: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (blocks, scales) whose decoded values have about `std` as their RMS: for checkpoints with random
    weights in the released layout. Codes are uniform (the 16 FP4 values have an RMS of 2.93), one scale for all."""
    import torch

    if cols % BLOCK:
        raise ValueError(f"MXFP4 needs the input size to be a multiple of {BLOCK}, got {cols}")
    blocks = torch.randint(0, 256, (experts, rows, cols // BLOCK, BLOCK // 2), dtype=torch.uint8,
                           generator=generator, device=device)
    exponent = SCALE_BIAS + round(math.log2(std / 2.93))
    scales = torch.full((experts, rows, cols // BLOCK), exponent, dtype=torch.uint8, device=device)
    return blocks, scales


QUANTIZATION_CONFIG = {  # what openai/gpt-oss-20b's config.json carries
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}
SHARD_BYTES = 4 * 2**30


def random_checkpoint_tensors(config, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """(name, tensor) of a random gpt-oss checkpoint in the released layout, one at a time: MXFP4
    `<expert weight>_blocks/_scales`, everything else in `dtype` (N(0, 0.02) matrices, unit norms, zero biases,
    N(0, 1) sinks so that attention tests notice them)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    for name, param in skeleton.named_parameters():
        short = name.rsplit(".", 1)[-1]
        if short in EXPERT_WEIGHTS:
            rows, cols = (2 * inter, hidden) if short == "gate_up_proj" else (hidden, inter)
            blocks, scales = random_experts(config.num_local_experts, rows, cols, generator=gen, device=device)
            yield f"{name}_blocks", blocks
            yield f"{name}_scales", scales
        elif short == "sinks":
            yield name, torch.randn(param.shape, generator=gen, device=device).to(dtype)
        elif "norm" in name:
            yield name, torch.ones(param.shape, dtype=dtype, device=device)
        elif short.endswith("bias"):
            yield name, torch.zeros(param.shape, dtype=dtype, device=device)
        else:
            yield name, (torch.randn(param.shape, generator=gen, device=device) * 0.02).to(dtype)


def write_random_checkpoint(config, out_dir, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> None:
    """random_checkpoint_tensors saved as the released checkpoints are (save_checkpoint), built shard by shard
    on `device`: nothing holds the whole model."""
    cfg = config.to_dict()
    # A config built from scratch names no architecture; vLLM then serves the folder as an embedding model.
    cfg["architectures"] = ["GptOssForCausalLM"]
    cfg["quantization_config"] = QUANTIZATION_CONFIG
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    save_checkpoint(random_checkpoint_tensors(config, dtype, device, seed), cfg, out_dir)


def save_checkpoint(tensors, config: dict, out_dir) -> None:
    """(name, tensor) pairs as safetensors shards of about 4 GiB with an index, and config.json: the layout
    transformers and vLLM read. Each shard is written as soon as it is full."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in shard.items()}, str(out_dir / file),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()

    for name, value in tensors:
        shard[name] = value
        if sum(v.numel() * v.element_size() for v in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total_bytes = sum((out_dir / f).stat().st_size for f in set(weight_map.values()))
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1), encoding="utf-8")
    config = {k: v for k, v in config.items() if k != "attn_implementation"}  # the loader's choice, not the file's
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
