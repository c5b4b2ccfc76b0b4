"""The pieces of an MXFP4 expert projection on gpt-oss-20b's shapes, timed one by one (GPU).

    python -m bench.mxfp4_kernels --out DIR [--tokens 4096]

- decode: the Triton kernel (mxfp4_triton, what training uses; checked bit for bit on every code under every
  scale) against the same decode written as torch ops and compiled by torch.compile (the path before it), for
  gate_up_proj and down_proj; time and GB/s moved (codes and scales read, bf16 written) against the card's copy
  bandwidth (a device-to-device copy of the same bytes);
- the grouped GEMM of a projection, forward (x W) and backward (dy W^T), with the bf16 weight row-major and
  column-major: the bf16 path and the MXFP4 path hand torch's grouped GEMM opposite layouts.
Rows are routed as in training: tokens x top-4, sorted by expert, about equal counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench

from gptoss_webui.mxfp4 import _decode, random_experts
from gptoss_webui.mxfp4_triton import decode_bf16
from gptoss_webui.train.experts import grouped_mm

EXPERTS, HIDDEN, INTER, TOP_K = 32, 2880, 2880, 4
SHAPES = {"gate_up_proj": (2 * INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}  # (rows = out, cols = in)


def _ms(fn) -> float:
    return round(do_bench(fn, warmup=25, rep=200), 4)


def exhaustive_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Every byte under every valid scale (0..254): [255, 1, 16, 16] codes, [255, 1, 16] scales."""
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(255, 16, 16).reshape(255, 1, 16, 16)
    scales = torch.arange(255, dtype=torch.uint8).view(255, 1, 1).expand(255, 1, 16).contiguous()
    return blocks, scales


def decode_rows() -> list[dict]:
    compiled = torch.compile(_decode, dynamic=False)
    small_b, small_s = exhaustive_inputs()
    reference = _decode(small_b, small_s, torch.bfloat16).view(torch.int16)
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        blocks, scales = random_experts(EXPERTS, out_f, in_f, device="cuda")
        moved = blocks.numel() + scales.numel() + 2 * EXPERTS * out_f * in_f  # bytes read + written
        copy_src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        timed = {"copy of the same bytes": (_ms(lambda src=copy_src: src.clone()), None),
                 "torch.compile": (_ms(lambda b=blocks, s=scales: compiled(b, s, torch.bfloat16)), None)}
        exact = torch.equal(decode_bf16(small_b.cuda(), small_s.cuda()).cpu().view(torch.int16), reference)
        timed["triton"] = (_ms(lambda b=blocks, s=scales: decode_bf16(b, s)), exact)
        for impl, (ms, exact) in timed.items():
            rows.append({"what": f"decode {name}", "impl": impl, "ms": ms, "gb_per_s": round(moved / ms / 1e6, 1),
                         "bit_exact": exact})
    return rows


def gemm_rows(tokens: int) -> list[dict]:
    n = tokens * TOP_K
    counts = torch.full((EXPERTS,), n // EXPERTS, dtype=torch.int32)
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        x = torch.randn(n, in_f, dtype=torch.bfloat16, device="cuda")
        dy = torch.randn(n, out_f, dtype=torch.bfloat16, device="cuda")
        w_oi = torch.randn(EXPERTS, out_f, in_f, dtype=torch.bfloat16, device="cuda")  # as decoded: [E, out, in]
        w_io = w_oi.transpose(1, 2).contiguous()  # transformers' bf16 parameter: [E, in, out]
        flops = 2 * n * in_f * out_f
        cases = {"forward, W row-major (bf16 path)": (x, w_io), "forward, W column-major (MXFP4 path)":
                 (x, w_oi.transpose(1, 2)), "backward, W^T column-major (bf16 path)": (dy, w_io.transpose(1, 2)),
                 "backward, W^T row-major (MXFP4 path)": (dy, w_oi)}
        for what, (a, b) in cases.items():
            ms = _ms(lambda a=a, b=b: grouped_mm(a, b, offs))
            rows.append({"what": f"grouped GEMM {name}", "impl": what, "ms": ms,
                         "tflops": round(flops / ms / 1e9, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--tokens", type=int, default=4096, help="tokens a step (rows = tokens x 4)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = decode_rows() + gemm_rows(args.tokens)
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": args.tokens}
    (args.out / "mxfp4_kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
