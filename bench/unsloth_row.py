"""Unsloth's gpt-oss LoRA on our random-weight checkpoint, timed like bench/train.py (issue 11).

    python -m bench.unsloth_row --model /tmp/gpt-oss-20b-random --out DIR            # GPU host: bf16, then 4bit
    python -m bench.unsloth_row --model M --out DIR --variant 4bit --timeout-s 240    # one variant

Each variant runs in a child process of its own (`--child`), which imports unsloth before transformers, loads
the checkpoint with FastLanguageModel (max_seq_length 4096, bf16, local files only), puts LoRA on it
(r=8, alpha 16, the gpt-oss-20b-1xh100 preset's targets: q/k/v/o and the experts of layers 7/15/23 as
peft `target_parameters`; --lora attn: q/k/v/o only), turns on Unsloth's gradient checkpointing ("unsloth"),
then times training steps on random ids as bench/train.py's `measure` does: micro batch 1, AdamW on the LoRA
parameters, 2 warm-ups, median of 5 steps, peak torch.cuda.max_memory_allocated from after the load.

Variants, on a checkpoint in the released layout (MXFP4 experts):
  bf16  load_in_4bit=False, load_in_16bit=True and UNSLOTH_MXFP4_KEEP_PACKED=0: experts decoded to bf16
        (without that variable unsloth_zoo keeps them packed MXFP4 even for a 16-bit load)
  4bit  load_in_4bit=True. Unsloth ignores it for a gpt-oss MXFP4 checkpoint (loader_utils.
        gpt_oss_keeps_checkpoint_quantization) and keeps the experts packed MXFP4, decoded per layer; on an
        unquantized checkpoint with bitsandbytes installed it quantizes to bnb 4-bit instead.
The row's `experts` field says which expert weights were actually loaded.

Every child writes DIR/unsloth_<variant>.json: the row, rewritten at each stage (import, load, lora, steps),
so a child killed on the way still leaves where it was. Its output and any traceback go to
DIR/unsloth_<variant>.log. The parent collects the rows into DIR/bench_unsloth.json and never imports unsloth.
--fallback: a variant whose preset row fails is run again with attention-only LoRA (the closest thing).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

GIB = 2**30
VARIANTS = ("bf16", "4bit")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_LAYERS = (7, 15, 23)  # presets/gpt-oss-20b-1xh100.yaml
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
OFFLINE_ENV = {  # the GPU host has no network: no hub calls, no statistics ping (unsloth models/_utils.py)
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1", "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache",
}


def child_env(variant: str) -> dict[str, str]:
    env = {**os.environ}
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    if variant == "bf16":
        env["UNSLOTH_MXFP4_KEEP_PACKED"] = "0"
    return env


# ---------------------------------------------------------------- child: one variant, one process

class Row:
    """The row of this process, written to disk whenever it changes."""

    def __init__(self, path: Path, **fields: Any) -> None:
        self.path, self.data = path, {"setup": "unsloth", **fields}

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.path.write_text(json.dumps(self.data, indent=1))


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("unsloth", "unsloth_zoo", "torch", "transformers", "peft", "trl", "bitsandbytes", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def expert_targets(model: Any, layers: tuple[int, ...]) -> list[str]:
    """Full names of the fused expert weights of `layers`, as our pipeline records them for peft."""
    names = [name for name, _ in model.named_parameters()]
    return [n for n in names if any(n.endswith(f"layers.{i}.mlp.experts.{w}") for i in layers for w in EXPERT_WEIGHTS)]


def describe_experts(model: Any) -> str:
    """What the first layer's experts hold after the load: bf16 tensors, packed MXFP4 or bnb 4-bit."""
    for name, module in model.named_modules():
        if name.endswith("layers.0.mlp.experts"):
            parts = [f"{n}: {type(p).__name__} {tuple(p.shape)} {str(p.dtype).removeprefix('torch.')}"
                     for n, p in module.named_parameters(recurse=True)]
            return f"{type(module).__name__}(" + "; ".join(parts[:4]) + ")"
    return "not found"


def run_child(args: argparse.Namespace) -> int:
    variant, lora = args.child, args.lora
    row = Row(args.out / f"unsloth_{variant}{'' if lora == 'preset' else '_' + lora}.json",
              name=f"unsloth {variant} {lora} ckpt=unsloth seq={args.seq}", variant=variant, lora=lora,
              seq=args.seq, model=str(args.model), status="running", stage="import",
              env={k: os.environ.get(k) for k in [*OFFLINE_ENV, "UNSLOTH_MXFP4_KEEP_PACKED"]})
    row.update()

    def on_term(signum, frame):  # `timeout` sends SIGTERM: leave the stage reached in the row
        raise TimeoutError(f"signal {signum} at stage {row.data['stage']}")

    signal.signal(signal.SIGTERM, on_term)
    torch = None
    try:
        t0 = time.perf_counter()
        import torch  # torch first is fine; transformers, peft and trl must come after unsloth, which patches them
        from unsloth import FastLanguageModel

        row.update(versions=versions(), import_s=round(time.perf_counter() - t0, 1), stage="load")
        t0 = time.perf_counter()
        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(args.model), max_seq_length=args.seq, dtype=torch.bfloat16,
            load_in_4bit=variant == "4bit", load_in_16bit=variant == "bf16", full_finetuning=False,
            use_gradient_checkpointing="unsloth", local_files_only=True)
        row.update(load_s=round(time.perf_counter() - t0, 1), experts=describe_experts(model),
                   attention_impl=getattr(model.config, "_attn_implementation", None),
                   loaded_gib=round(torch.cuda.memory_allocated() / GIB, 2) if torch.cuda.is_available() else None,
                   stage="lora")
        targets = expert_targets(model, tuple(args.expert_layers)) if lora == "preset" else []
        model = FastLanguageModel.get_peft_model(
            model, r=8, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=ATTENTION,
            target_parameters=targets, use_gradient_checkpointing="unsloth", random_state=3407)
        FastLanguageModel.for_training(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if lora == "preset" and not targets:
            row.update(note=f"no expert weights named layers.N.mlp.experts.{EXPERT_WEIGHTS} after the load: "
                            "attention-only LoRA")
        row.update(target_parameters=targets, trainable_params=trainable, stage="steps")
        row.update(**measure(model, torch, args.seq, args.warmup, args.steps, args.profile), status="ok",
                   stage="done")
    except BaseException as exc:  # noqa: BLE001  (a row must say what went wrong, whatever it was)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        oom = torch is not None and isinstance(exc, torch.OutOfMemoryError)
        row.update(status="OOM" if oom else f"error: {type(exc).__name__}: {first}")
        traceback.print_exc()
    if torch is not None and torch.cuda.is_available():
        row.update(peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                   reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))
    print(json.dumps(row.data), flush=True)
    return 0 if row.data["status"] == "ok" else 1


def measure(model: Any, torch: Any, seq: int, warmup: int, steps: int, profile: bool = False) -> dict[str, Any]:
    """bench/train.py's `measure` loop: random ids, labels = ids, AdamW on the trainable parameters; profile: one
    more step under torch.profiler, as bench/train.py --profile does."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # from here on: the weights plus training

    def step() -> tuple[float, float]:
        ids = torch.randint(0, 199_998, (1, seq), device=device, generator=gen)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, loss.item()

    times, losses = zip(*(step() for _ in range(warmup + steps)), strict=True)
    step_s = statistics.median(times[warmup:])
    row = {"first_step_s": round(times[0], 3), "step_s": round(step_s, 4), "tokens_per_s": round(seq / step_s, 1),
           "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "steps_timed": steps}
    if profile:
        from bench.step_profile import profile_step

        row["profile"] = profile_step(step, device)
    return row


# ---------------------------------------------------------------- parent: one child per variant

def run_variant(args: argparse.Namespace, variant: str, lora: str, deadline: float) -> dict[str, Any]:
    timeout = min(args.timeout_s, deadline - time.monotonic() - 10)
    if timeout < 60:
        return {"setup": "unsloth", "variant": variant, "lora": lora, "seq": args.seq,
                "status": "skipped (time budget)"}
    suffix = "" if lora == "preset" else "_" + lora
    row_path, log_path = args.out / f"unsloth_{variant}{suffix}.json", args.out / f"unsloth_{variant}{suffix}.log"
    row_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.unsloth_row", "--child", variant, "--lora", lora,
           "--model", str(args.model.resolve()), "--out", str(args.out.resolve()), "--seq", str(args.seq),
           "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--expert-layers", *map(str, args.expert_layers)] + (["--profile"] if args.profile else [])
    print(f"--- unsloth {variant} {lora}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(variant),
                                cwd=Path(__file__).resolve().parents[1])  # the repo root: `-m bench...` from anywhere
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.terminate()  # the child's SIGTERM handler records the stage
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    row = json.loads(row_path.read_text()) if row_path.is_file() else {"setup": "unsloth", "variant": variant,
                                                                         "lora": lora, "seq": args.seq}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    if timed_out:
        row["status"] = f"timeout: {timeout:.0f} s, at stage {row.get('stage', '?')} (child exit {rc})"
    elif row.get("status", "running") == "running":  # killed before it could write its own verdict
        row["status"] = f"error: child exit {rc} at stage {row.get('stage', '?')}"
    if row["status"] != "ok":
        row["log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
    row_path.write_text(json.dumps(row, indent=1))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/gpt-oss-20b-random"),
                        help="checkpoint folder (its name must hold gpt-oss-20b for Unsloth to keep MXFP4 as is)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--lora", choices=["preset", "attn"], default="preset",
                        help="preset: q/k/v/o + experts of --expert-layers; attn: q/k/v/o only")
    parser.add_argument("--expert-layers", type=int, nargs="*", default=list(EXPERT_LAYERS))
    parser.add_argument("--fallback", action="store_true", help="rerun a failed preset row with --lora attn")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="profile one more step (bench/step_profile.py)")
    parser.add_argument("--timeout-s", type=float, default=300, help="per child process")
    parser.add_argument("--budget-s", type=float, default=1e9, help="all children together; none starts with "
                        "under 60 s left")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return run_child(args)
    rows, deadline = [], time.monotonic() + args.budget_s
    for variant in args.variant:
        rows.append(run_variant(args, variant, args.lora, deadline))
        if args.fallback and args.lora == "preset" and rows[-1]["status"] not in ("ok", "skipped (time budget)"):
            rows.append(run_variant(args, variant, "attn", deadline))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "log_tail"}), flush=True)
    (args.out / "bench_unsloth.json").write_text(json.dumps({"rows": rows}, indent=1))
    for r in rows:
        print(f"{r.get('name', r['variant'])}: {r.get('tokens_per_s', '-')} tokens/s, step {r.get('step_s', '-')} s, "
              f"peak {r.get('peak_gib', '-')} GiB, experts {r.get('experts', '-')}: {r['status']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
