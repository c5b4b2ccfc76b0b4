"""The MXFP4 decode as one Triton kernel, for GPUs (imported only where Triton is; mxfp4.decode picks it).

Decoding is memory-bound: per weight it reads 0.53 bytes (half a code byte, 1/32 of a scale byte) and writes 2.
So the kernel does one pass: each program reads a run of code bytes and their scales, builds each scaled value's
bf16 bits with integer ops (no table lookup, no rounding: the scale is a power of two), and writes the two bf16
values of a byte as one 32-bit word, low nibble first, as the checkpoint orders them.

It is registered as the custom op `gptoss::mxfp4_decode`, so that a compiled layer calls it as one opaque kernel
instead of tracing and re-fusing the elementwise decode.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BYTES_PER_PROGRAM = 2048  # 16 code bytes (one 32-value block) per thread at 4 warps


@triton.jit
def _scaled_bf16_bits(code, exponent):
    """An e2m1 code (0..15: sign, 2 exponent bits, 1 mantissa bit) times 2^(exponent - 127), as bf16 bits.

    Integer ops only, exact everywhere: the code's bf16 exponent field plus the scale's exponent, with the
    results below bf16's normal range written as subnormals and those above it as infinity."""
    magnitude = code & 7
    # 2..7 are normal (exponent field (m >> 1) + 126, one mantissa bit); 1 is 0.5 (field 126); 0 is zero.
    field = tl.where(magnitude >= 2, (magnitude >> 1) + 126, 126) + exponent - 127
    mantissa = tl.where(magnitude >= 2, (magnitude & 1) << 6, 0)
    normal = tl.where(field >= 255, 0x7F80, (field << 7) | mantissa)
    subnormal = (128 | mantissa) >> (1 - field)  # field is 0 or -1 here: exact, no bit shifted out
    bits = tl.where(magnitude == 0, 0, tl.where(field >= 1, normal, subnormal))
    return bits | ((code & 8) << 12)


@triton.jit
def _decode_kernel(blocks_ptr, scales_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_bytes
    byte = tl.load(blocks_ptr + offsets, mask=mask, other=0).to(tl.int32)
    exponent = tl.load(scales_ptr + offsets // 16, mask=mask, other=127).to(tl.int32)  # E8M0: 2^(e - 127)
    low = _scaled_bf16_bits(byte & 15, exponent)
    high = _scaled_bf16_bits(byte >> 4, exponent)
    tl.store(out_ptr + offsets, low | (high << 16), mask=mask)


@triton.jit
def _fp32_bits(code):
    """An e2m1 code -> the fp32 bits of its value (unscaled)."""
    magnitude = code & 7
    bits = tl.where(magnitude >= 2, (magnitude + 252) << 22, tl.where(magnitude == 1, 0x3F000000, 0))
    return bits | ((code & 8) << 28)


@triton.jit
def _decode_tile_kernel(blocks_ptr, scales_ptr, lut_ptr, step_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr,
                        METHOD: tl.constexpr):
    """BLOCKS scale blocks (16 code bytes each) a program: one scale load per block, not per byte."""
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    row_ok = rows < n_blocks
    offsets = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = row_ok[:, None]
    byte = tl.load(blocks_ptr + offsets, mask=mask, other=0).to(tl.int32)
    exponent = tl.load(scales_ptr + rows, mask=row_ok, other=127).to(tl.int32)[:, None]
    if METHOD == 1:  # integer ops, exact everywhere
        packed = _scaled_bf16_bits(byte & 15, exponent) | (_scaled_bf16_bits(byte >> 4, exponent) << 16)
    elif METHOD == 2:  # a 256-entry table of byte -> two unscaled bf16, exponent added where nonzero
        packed = tl.load(lut_ptr + byte) + (exponent - 127) * tl.load(step_ptr + byte)
        if tl.max(tl.max((exponent < 2) | (exponent > 252), axis=1), axis=0):  # outside 2..252: exact path
            packed = _scaled_bf16_bits(byte & 15, exponent) | (_scaled_bf16_bits(byte >> 4, exponent) << 16)
    else:  # fp32 multiply by the power of two
        scale = tl.where(exponent > 0, exponent << 23, (exponent + 1) << 22).to(tl.float32, bitcast=True)
        low = (_fp32_bits(byte & 15).to(tl.float32, bitcast=True) * scale).to(tl.bfloat16)
        high = (_fp32_bits(byte >> 4).to(tl.float32, bitcast=True) * scale).to(tl.bfloat16)
        packed = (low.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (high.to(tl.int16, bitcast=True).to(
            tl.int32) << 16)
    tl.store(out_ptr + offsets, packed, mask=mask)


METHODS = {"int": 0, "int2d": 1, "lut2d": 2, "fp32_2d": 3}
METHOD = METHODS[os.environ.get("GPTOSS_MXFP4_KERNEL", "int")]
_tables: dict = {}


def _lut(device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _tables:
        from gptoss_webui.mxfp4 import FP4_VALUES

        values = torch.tensor(FP4_VALUES, dtype=torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
        byte = torch.arange(256)
        low, high = values[byte & 15], values[byte >> 4]
        step = ((byte & 7) != 0).int() << 7 | (((byte >> 4) & 7) != 0).int() << 23
        _tables[device] = ((low | (high << 16)).to(torch.int32).to(device), step.to(torch.int32).to(device))
    return _tables[device]


@torch.library.custom_op("gptoss::mxfp4_decode", mutates_args=())
def decode_bf16(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., rows, cols/32, 16] uint8 codes + [..., rows, cols/32] uint8 scales -> [..., rows, cols] bf16."""
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty((*blocks.shape[:-2], blocks.shape[-2] * 32), dtype=torch.bfloat16, device=blocks.device)
    n_bytes = blocks.numel()
    if n_bytes and METHOD == 0:
        _decode_kernel[(triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)](
            blocks, scales, out.view(torch.int32), n_bytes, BLOCK=BYTES_PER_PROGRAM)
    elif n_bytes:
        lut, step = _lut(blocks.device)
        n_blocks = n_bytes // 16
        _decode_tile_kernel[(triton.cdiv(n_blocks, BYTES_PER_PROGRAM // 16),)](
            blocks, scales, lut, step, out.view(torch.int32), n_blocks, BLOCKS=BYTES_PER_PROGRAM // 16,
            METHOD=METHOD)
    return out


@decode_bf16.register_fake
def _(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return blocks.new_empty((*blocks.shape[:-2], blocks.shape[-2] * 32), dtype=torch.bfloat16)
