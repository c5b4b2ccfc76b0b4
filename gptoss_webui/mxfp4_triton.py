"""The MXFP4 decode as one Triton kernel, for GPUs (imported only where Triton is; mxfp4.decode picks it).

Decoding is memory-bound when done well: per weight it reads 0.53 bytes (half a code byte, 1/32 of a scale byte)
and writes 2. Integer bit-building per value made an earlier version bound by the integer units instead (half the
copy bandwidth, like torch.compile's decode); this one does per code byte one table load and one multiply-add:
- a 256-entry table gives a byte's two unscaled values as bf16 bits, packed low nibble first (the checkpoint's
  order) into one 32-bit word, and a second table the step that adds 1 to the exponent field of each nonzero half;
- a block's E8M0 scale 2^(e - 127) then adds (e - 127) steps. This is exact while every exponent stays in bf16's
  normal range, which holds for e in 2..252; a program whose blocks hold a scale outside that range (no released
  checkpoint has one) takes the exact integer path instead, with subnormals and infinities.
Each program handles 128 scale blocks of 16 code bytes: one scale load per block. bench/README.md has the timings
(H200: 81 % of the copy bandwidth) and the variants that lost.

It is registered as the custom ops `gptoss::mxfp4_decode` (and `_again`, for a backward's decode), so that a
compiled layer calls it as one opaque kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCKS_PER_PROGRAM = 128  # scale blocks (16 code bytes each): 2048 bytes a program
# The scales for which adding (e - 127) to the exponent field of every FP4 value (0.5 .. 6) stays normal in bf16.
FAST_MIN_SCALE, FAST_MAX_SCALE = 2, 252


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
def _decode_kernel(blocks_ptr, scales_ptr, pairs_ptr, steps_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr,
                   FAST_MIN: tl.constexpr, FAST_MAX: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    row_ok = rows < n_blocks
    offsets = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = row_ok[:, None]
    byte = tl.load(blocks_ptr + offsets, mask=mask, other=0).to(tl.int32)
    exponent = tl.load(scales_ptr + rows, mask=row_ok, other=127).to(tl.int32)[:, None]
    packed = tl.load(pairs_ptr + byte) + (exponent - 127) * tl.load(steps_ptr + byte)
    if tl.max(tl.max((exponent < FAST_MIN) | (exponent > FAST_MAX), axis=1), axis=0):
        packed = _scaled_bf16_bits(byte & 15, exponent) | (_scaled_bf16_bits(byte >> 4, exponent) << 16)
    tl.store(out_ptr + offsets, packed, mask=mask)


_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _byte_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per byte value: its two FP4 values as packed bf16 bits, and 1 << 7 in each half whose value is nonzero."""
    if device not in _tables:
        from gptoss_webui.mxfp4 import FP4_VALUES

        bits = torch.tensor(FP4_VALUES, dtype=torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
        byte = torch.arange(256)
        low, high = byte & 15, byte >> 4
        pairs = bits[low] | (bits[high] << 16)
        steps = ((low & 7) != 0).int() << 7 | ((high & 7) != 0).int() << 23
        _tables[device] = (pairs.to(torch.int32).to(device), steps.to(torch.int32).to(device))
    return _tables[device]


def _decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., rows, cols/32, 16] uint8 codes + [..., rows, cols/32] uint8 scales -> [..., rows, cols] bf16."""
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty((*blocks.shape[:-2], blocks.shape[-2] * 32), dtype=torch.bfloat16, device=blocks.device)
    n_blocks = scales.numel()
    if n_blocks:
        pairs, steps = _byte_tables(blocks.device)
        _decode_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
            blocks, scales, pairs, steps, out.view(torch.int32), n_blocks, BLOCKS=BLOCKS_PER_PROGRAM,
            FAST_MIN=FAST_MIN_SCALE, FAST_MAX=FAST_MAX_SCALE)
    return out


def _shape(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return blocks.new_empty((*blocks.shape[:-2], blocks.shape[-2] * 32), dtype=torch.bfloat16)


# Two names for one kernel: a compiled layer would merge two calls of one op on the same codes and keep the
# forward's result for the backward; the backward's own decode (when the decoded weights are not kept) uses
# the second name, so that nothing decoded outlives its matmul.
decode_bf16 = torch.library.custom_op("gptoss::mxfp4_decode", _decode, mutates_args=())
decode_bf16_again = torch.library.custom_op("gptoss::mxfp4_decode_again", _decode, mutates_args=())
decode_bf16.register_fake(_shape)
decode_bf16_again.register_fake(_shape)
