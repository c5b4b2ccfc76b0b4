"""vLLM's LoRA shrink and expand kernels on gpt-oss's attention shapes, tuned on this GPU: the tables vLLM reads
from VLLM_TUNED_CONFIG_FOLDER instead of its defaults (GPU host with vLLM).

    python -m bench.lora_kernels --model /tmp/gpt-oss-20b-random --out DIR [--budget-s 300]

A LoRA engine runs, per layer and step, one shrink (x A, into a float32 buffer it zeroes first) and one expand
(y += buffer B) for the fused qkv_proj (3 slices) and for o_proj. With vLLM 0.26's default configs a shrink took
4.8 us and an expand 6.6 us at 64 streams on an H200 (bench/results/2026-12-01-h200-profile-64.txt).
Each candidate config runs as the engine runs it: vLLM's own `_lora_shrink` / `_lora_expand` (the op's config lookup
answered with the candidate), all tokens on one adapter, the grid over max_loras + 1 adapter slots as without
specialize_active_lora, `--reps` calls captured in one CUDA graph and replayed. vLLM's default config is always a
candidate, so a tuned entry is never slower than the default as measured here.

Triton compiles every (config, shape) variant once; `--workers` processes compile them first into a shared
TRITON_CACHE_DIR, then this process times them. Decode token counts (the engine's CUDA graph sizes) come before
prefill ones, so a run cut short by --budget-s still covers decoding; vLLM takes the nearest token count it finds.

DIR gets {GPU}_SHRINK.json and {GPU}_EXPAND_TRUE.json (vLLM's layout: [max_loras + 1][num_slices][tokens][k][n],
k and n the GEMM's inner and output sizes), lora_kernels.json (every timed row: default_us, best_us, the config)
and lora_kernels.md (the table per token count, and the qkv + o total per layer).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
PREFILL_TOKENS = (128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class Shape:
    """One LoRA GEMM of a layer: `op` (shrink: x [m, k] -> [slices, m, rank]; expand: [slices, m, rank] ->
    y [m, sum(outs)]), for `module`."""
    op: str
    module: str
    k_in: int  # shrink: the layer's input size
    outs: tuple[int, ...]  # expand: each slice's output size
    rank: int

    @property
    def slices(self) -> int:
        return len(self.outs)

    @property
    def table_k_n(self) -> tuple[int, int]:
        """The (k, n) keys vLLM looks the config up with: shrink (hidden, rank), expand (rank, the widest slice)."""
        return (self.k_in, self.rank) if self.op == "shrink" else (self.rank, max(self.outs))


def shapes_for(model_cfg: dict, ranks: tuple[int, ...]) -> list[Shape]:
    """qkv_proj (slices q, k, v) and o_proj of a gpt-oss layer, at each rank."""
    hidden = model_cfg["hidden_size"]
    head = model_cfg.get("head_dim") or hidden // model_cfg["num_attention_heads"]
    q, kv = model_cfg["num_attention_heads"] * head, model_cfg["num_key_value_heads"] * head
    out = []
    for rank in ranks:
        out += [Shape("shrink", "qkv_proj", hidden, (q, kv, kv), rank), Shape("shrink", "o_proj", q, (hidden,), rank),
                Shape("expand", "qkv_proj", hidden, (q, kv, kv), rank), Shape("expand", "o_proj", q, (hidden,), rank)]
    return out


def token_class(m: int) -> int:
    """The token count Triton compiles a variant for: it specializes integer arguments equal to 1 and divisible by
    16, so one compile per class serves every count in it."""
    return 1 if m == 1 else 16 if m % 16 == 0 else 2


def candidates(shape: Shape, m: int) -> list[dict]:
    """The configs tried for `shape` at `m` tokens (vLLM's default is added by the caller). A block wider than
    the tokens only adds masked rows, so below 16 tokens only 16-row blocks are tried."""
    block_ms = [16] if m < 16 else [16, 32, 64]
    if shape.op == "shrink":
        out = []
        for block_m, block_k in itertools.product(block_ms, (32, 64, 128, 256)):
            steps = -(-shape.k_in // block_k)
            for split_k in (1, 4, 8, 16, 32, 64):
                if split_k <= steps:  # more splits than K blocks: programs that only add zeros
                    out.append(dict(block_m=block_m, block_n=16, block_k=block_k, split_k=split_k, num_warps=4,
                                    num_ctas=1, num_stages=2, group_size_m=8, max_nreg=None))
        return out
    return [dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=warps, num_ctas=1, num_stages=2,
                 max_nreg=None)
            for block_m, block_n, block_k, warps in itertools.product(block_ms, (32, 64, 128, 256), (16, 32), (2, 4))]


# --- running the kernels (GPU, vLLM) ------------------------------------------------------------------------------

class Kernels:
    """vLLM's shrink/expand ops with their config lookup answered by `self.config` (None: vLLM's own lookup)."""

    def __init__(self, max_loras: int, max_tokens: int):
        import torch
        import vllm.lora.ops.triton_ops.lora_expand_op as expand_mod
        import vllm.lora.ops.triton_ops.lora_shrink_op as shrink_mod
        from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

        self.torch, self.max_loras, self.config = torch, max_loras, None
        self.vllm_lookup = shrink_mod.get_lora_op_configs
        for mod in (shrink_mod, expand_mod):
            mod.get_lora_op_configs = self._lookup
        self.shrink, self.expand = shrink_mod._lora_shrink, expand_mod._lora_expand
        self.meta = {}
        self._make_meta = lambda: LoRAKernelMeta.make(max_loras, max_tokens, device="cuda")
        self.weights: dict[Shape, list] = {}

    def _lookup(self, *args, **kwargs) -> dict:
        return dict(self.config) if self.config is not None else self.vllm_lookup(*args, **kwargs)

    def default(self, shape: Shape, m: int) -> dict:
        """vLLM's built-in config (no VLLM_TUNED_CONFIG_FOLDER), asked as its op asks: shrink by the input size,
        expand by the widest slice."""
        hidden = shape.k_in if shape.op == "shrink" else max(shape.outs)
        return self.vllm_lookup(shape.op, max_loras=self.max_loras + 1, batch=m, hidden_size=hidden, rank=shape.rank,
                                num_slices=shape.slices, add_inputs=True if shape.op == "expand" else None)

    def call(self, shape: Shape, m: int):
        """A no-argument function that runs `shape` at `m` tokens once, as a LoRA engine's forward does."""
        torch = self.torch
        if m not in self.meta:  # every token on the adapter in slot 0
            meta = self.meta[m] = self._make_meta()
            meta.prepare_tensors(torch.zeros(m, dtype=torch.int32, device="cuda"))
        meta_args = self.meta[m].meta_args(m, False)
        if shape not in self.weights:  # kept: vLLM caches the weights' pointers by address
            # lora_a [max_loras, rank, k_in] per slice; lora_b [max_loras, out, rank]
            dims = [(shape.rank, shape.k_in)] * shape.slices if shape.op == "shrink" else [
                (out, shape.rank) for out in shape.outs]
            self.weights[shape] = [torch.zeros(self.max_loras, *d, dtype=torch.bfloat16, device="cuda") for d in dims]
        weights = self.weights[shape]
        if shape.op == "shrink":
            x = torch.zeros(m, shape.k_in, dtype=torch.bfloat16, device="cuda")
            buf = torch.empty(shape.slices, m, shape.rank, dtype=torch.float32, device="cuda")
            return lambda: self.shrink(x, weights, buf, *meta_args, 1.0)
        buf = torch.zeros(shape.slices, m, shape.rank, dtype=torch.float32, device="cuda")
        y = torch.zeros(m, sum(shape.outs), dtype=torch.bfloat16, device="cuda")
        return lambda: self.expand(buf, weights, y, *meta_args, offset_start=0, add_inputs=True)

    def time_us(self, run, reps: int, replays: int = 5) -> float:
        """Microseconds per call, `reps` calls captured in one CUDA graph (as the engine replays them)."""
        torch = self.torch
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                run()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        del graph
        return start.elapsed_time(end) * 1000 / (reps * replays)


def compile_jobs(jobs: list[tuple[Shape, int, dict]], max_loras: int) -> int:
    """In a worker process: run each (shape, tokens, config) once, so that Triton compiles it into the shared
    cache. Returns how many failed (a config Triton refuses is skipped when timing too)."""
    kernels, failed = Kernels(max_loras, max(m for _, m, _ in jobs)), 0
    for shape, m, config in jobs:
        kernels.config = config
        try:
            kernels.call(shape, m)()
        except Exception:  # noqa: BLE001 - e.g. out of shared memory: the config is not a candidate
            failed += 1
    kernels.torch.cuda.synchronize()
    return failed


def precompile(plan: list[tuple[Shape, int, list[dict]]], max_loras: int, workers: int) -> dict:
    """Compile every variant in `workers` processes at once (one per token class is enough)."""
    seen, jobs = set(), []
    for shape, m, configs in plan:
        for config in configs:
            key = (shape, token_class(m), json.dumps(config, sort_keys=True))
            if key not in seen:
                seen.add(key)
                jobs.append((shape, m, config))
    t0 = time.perf_counter()
    chunks = [jobs[i::workers] for i in range(workers)]
    with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = sum(pool.map(compile_jobs, chunks, [max_loras] * workers))
    return {"variants": len(jobs), "failed": failed, "workers": workers, "s": round(time.perf_counter() - t0, 1)}


def tune(args: argparse.Namespace) -> dict:
    import torch

    deadline = time.monotonic() + args.budget_s  # the compiles count too
    model_cfg = json.loads((Path(args.model) / "config.json").read_text())
    tokens = [m for m in (*DECODE_TOKENS, *PREFILL_TOKENS) if m <= args.max_tokens]
    kernels = Kernels(args.max_loras, max(tokens))
    plan = []
    for m in tokens:
        for shape in shapes_for(model_cfg, tuple(args.ranks)):
            default = kernels.default(shape, m)
            plan.append((shape, m, [default, *(c for c in candidates(shape, m) if c != default)]))
    compiled = precompile(plan, args.max_loras, args.workers)
    print(f"compiled {compiled}", file=sys.stderr)
    rows = []
    for shape, m, configs in plan:
        if time.monotonic() > deadline:
            break
        timed = []
        for config in configs:
            kernels.config = config
            try:
                timed.append((kernels.time_us(kernels.call(shape, m), args.reps), config))
            except Exception as exc:  # noqa: BLE001 - a config this shape cannot run
                print(f"skipped {shape.op} {shape.module} m={m} {config}: {exc}"[:300], file=sys.stderr)
        if not timed:
            continue
        default_us = timed[0][0]
        best_us, best = min(timed, key=lambda t: t[0])
        rows.append({"op": shape.op, "module": shape.module, "rank": shape.rank, "slices": shape.slices,
                     "tokens": m, "k": shape.table_k_n[0], "n": shape.table_k_n[1], "default_us": round(default_us, 2),
                     "best_us": round(best_us, 2), "speedup": round(default_us / best_us, 2), "tried": len(timed),
                     "config": best})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "config"}), file=sys.stderr)
    gpu = torch.cuda.get_device_name()
    return {"gpu": gpu, "vllm": __import__("vllm").__version__, "max_loras": args.max_loras, "compile": compiled,
            "rows": rows}


# --- vLLM's tables and the report (no GPU needed) -------------------------------------------------------------------

def table_file_name(gpu: str, op: str) -> str:
    """The file vLLM 0.26 looks for (lora/ops/triton_ops/utils.py load_lora_op_config); the engine's LoRA linear
    layers call expand with add_inputs=True."""
    name = gpu.replace(" ", "_").replace("-", "_")
    return f"{name}_{op.upper()}_TRUE.json" if op == "expand" else f"{name}_{op.upper()}.json"


def vllm_tables(result: dict) -> dict[str, dict]:
    """File name -> vLLM's nested table [max_loras + 1][num_slices][tokens][k][n] of the best configs."""
    tables: dict[str, dict] = {}
    for row in result["rows"]:
        table = tables.setdefault(table_file_name(result["gpu"], row["op"]), {})
        node = table
        for key in (result["max_loras"] + 1, row["slices"], row["tokens"], row["k"]):
            node = node.setdefault(str(key), {})
        node[str(row["n"])] = row["config"]
    return tables


def report(result: dict) -> str:
    """Markdown: per rank and token count, each GEMM's default and tuned time, and a layer's sum (qkv + o)."""
    lines = [f"LoRA kernels on {result['gpu']} (vLLM {result['vllm']}, max_loras {result['max_loras']}): us per call "
             "in a CUDA graph, default -> tuned", "",
             "| rank | tokens | qkv shrink | qkv expand | o shrink | o expand | a layer: default -> tuned |",
             "|---|---|---|---|---|---|---|"]
    cells: dict[tuple[int, int], dict[str, dict]] = {}
    for row in result["rows"]:
        cells.setdefault((row["rank"], row["tokens"]), {})[f"{row['module']} {row['op']}"] = row
    names = ("qkv_proj shrink", "qkv_proj expand", "o_proj shrink", "o_proj expand")
    for (rank, m), got in sorted(cells.items()):
        shown = [f"{got[n]['default_us']} -> {got[n]['best_us']}" if n in got else "-" for n in names]
        total = (f"{sum(r['default_us'] for r in got.values()):.1f} -> {sum(r['best_us'] for r in got.values()):.1f}"
                 if len(got) == len(names) else "-")
        lines.append(f"| {rank} | {m} | " + " | ".join(shown) + f" | {total} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, table in vllm_tables(result).items():
        (out / name).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    (out / "lora_kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "lora_kernels.md").write_text(report(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a gpt-oss folder (its config.json gives the shapes)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16],
                        help="--max-lora-rank values to tune (the engine's, not the adapter's)")
    parser.add_argument("--max-loras", type=int, default=2, help="the engine's --max-loras (serve.max_loras)")
    parser.add_argument("--max-tokens", type=int, default=PREFILL_TOKENS[-1])
    parser.add_argument("--reps", type=int, default=20, help="calls per CUDA graph")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--budget-s", type=float, default=300, help="time no new shape after this many seconds")
    args = parser.parse_args(argv)
    os.environ.pop("VLLM_TUNED_CONFIG_FOLDER", None)  # the defaults are vLLM's built-in ones
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="lora-kernels-triton-"))
    result = tune(args)
    write(result, args.out)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
