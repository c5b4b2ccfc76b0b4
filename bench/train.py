"""Time LoRA training steps on gpt-oss-20b's architecture (random bf16 weights): our setup against plain HF+peft.

    python -m bench.train --grid core --out DIR     # GPU host (bench/gpu/run.sh): the rows that matter most
    python -m bench.train --grid full --out DIR     # GPU host: seq 1024/4096/8192, checkpointing, eager/flex
    python -m bench.train --grid smoke --out DIR    # CPU: tiny shapes, checks the code path only
(full = core + rest; short and extra are the rows bench/README.md reports besides; a 10-minute device call
fits core or rest, not full.)

"ours" is the training worker's model setup: a TrainConfig from a preset plus overrides, the attention that
choose_attention picks, then worker.prepare_model (gradient checkpointing + LoRA exactly as in training).
"hf" is the plain transformers + peft baseline of ../shared/GPU-STACK.md (LoRA r=16 on q,k,v,o). Both run on
one card, each row in a process of its own (--same-process: all in one), so every figure can be read as a ratio.
Each row holds the peak torch.cuda.max_memory_allocated, the median step time (AdamW on the LoRA parameters,
micro batch 1 unless the row says otherwise), tokens/s and the estimator's predicted peak (train/memory.py,
peak_allocated_gib) with its error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.model import build_random_model, gpt_oss_20b_config
from bench.step_profile import profile_step
from gptoss_webui.architecture import BUILTIN_ARCHITECTURES, Architecture
from gptoss_webui.config import TrainConfig
from gptoss_webui.presets import load_recipe
from gptoss_webui.train.attention import choose_attention
from gptoss_webui.train.memory import estimate
from gptoss_webui.train.worker import prepare_model, saved_tensors_place

GIB = 2**30
PRESET = "gpt-oss-20b-1xh100"
BASELINE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class Case:
    setup: str  # "ours" (worker.prepare_model) or "hf" (plain transformers + peft)
    seq: int
    checkpointing: bool
    attention: str  # as requested: auto (ours only), eager or flex_attention
    lora: str  # "preset" (r=8, attention + experts of layers 7/15/23) or "qkvo16" (r=16 on q,k,v,o)
    pad_to: int = 0  # 0: no attention_mask; N: an attention_mask, input right-padded to a multiple of N (as a collator)
    compile: bool = False  # ours only: train.compile (worker.compile_layers)
    base: str = "bf16"  # ours only: train.base_weights (mxfp4: the experts stay MXFP4, decoded a layer at a time)
    batch: int = 1  # micro batch: sequences of `seq` tokens a step
    offload: bool = False  # ours only: train.offload_activations (the saved activations in pinned CPU memory)

    @property
    def length(self) -> int:
        """Tokens the model sees (padding included)."""
        return -(-self.seq // self.pad_to) * self.pad_to if self.pad_to else self.seq

    @property
    def name(self) -> str:
        pad = f" mask, padded to {self.length}" if self.pad_to else ""
        setup = setup_label(asdict(self))
        batch = f"{self.batch} x " if self.batch > 1 else ""
        return (f"{setup} {self.lora} {self.attention} ckpt={'on' if self.checkpointing else 'off'} "
                f"seq={batch}{self.seq}{pad}")


def setup_label(case: dict[str, Any]) -> str:
    """"ours+compile mxfp4 offload": a Case's setup and the switches that change it (a Case as a dict, or a row)."""
    label = case["setup"] + ("+compile" if case.get("compile") else "")
    label += " mxfp4" if case.get("base") == "mxfp4" else ""
    return label + (" offload" if case.get("offload") else "")


def _c(setup: str, seq: int, ckpt: bool, attention: str, lora: str, pad_to: int = 0, compile: bool = False,
       base: str = "bf16", batch: int = 1, offload: bool = False) -> Case:
    return Case(setup, seq, ckpt, attention, lora, pad_to, compile, base, batch, offload)


# Priority order: the core rows first; rows expected to run out of memory on 80 GB last.
CORE = [_c("ours", 4096, True, "auto", "preset"), _c("hf", 4096, True, "flex_attention", "qkvo16"),
        _c("hf", 4096, True, "eager", "qkvo16")]
REST = [
    _c("hf", 4096, True, "flex_attention", "qkvo16"),  # the anchor again, when REST runs on another machine
    _c("ours", 4096, True, "auto", "qkvo16"),  # the baseline's LoRA through our setup: isolates the setup
    _c("ours", 8192, True, "auto", "preset"), _c("hf", 8192, True, "flex_attention", "qkvo16"),
    _c("ours", 1024, True, "auto", "preset"), _c("ours", 1024, False, "auto", "preset"),
    _c("ours", 4096, True, "eager", "preset"), _c("hf", 1024, True, "eager", "qkvo16"),
    _c("hf", 1024, False, "eager", "qkvo16"), _c("ours", 4096, False, "auto", "preset"),
    _c("ours", 8192, True, "eager", "preset"),
]
# The e2e run's first batch: one 88-token example with its attention mask (the former worker.PadCollator, batch 1).
# Under 128 query tokens torch's inductor picks its flex *decoding* kernel, which failed in training; padding the
# batch to a multiple of 128 (mask 0, labels -100 on the padding) is the proposed fix. Run each in a fresh process:
# the first call's shape decides what inductor compiles.
SHORT = [_c("ours", 88, True, "auto", "preset", pad_to=1), _c("ours", 88, True, "auto", "preset", pad_to=128)]
GRIDS: dict[str, list[Case]] = {
    "core": CORE,
    "rest": REST,
    "full": CORE + REST[1:],
    "short": SHORT,
    # Rows a 10-minute call could not reach after REST; the HF row anchors x best HF at 4096 without checkpointing.
    "extra": [_c("hf", 4096, False, "flex_attention", "qkvo16"), _c("ours", 4096, False, "auto", "preset"),
              _c("ours", 8192, True, "eager", "preset")],
    # The throughput goal (seq 4096, checkpointing): the anchor, our setup as shipped, then compiled layers.
    "speed": [_c("hf", 4096, True, "flex_attention", "qkvo16"), _c("ours", 4096, True, "auto", "preset"),
              _c("ours", 4096, True, "auto", "preset", compile=True),
              _c("ours", 4096, True, "auto", "qkvo16", compile=True)],
    # The estimator for our loss at other lengths and without checkpointing, and the compile gain at 8192.
    "calib": [_c("ours", 8192, True, "auto", "preset", compile=True),
              _c("ours", 1024, False, "auto", "preset", compile=True),
              _c("hf", 8192, True, "flex_attention", "qkvo16")],
    # Small cards (issue 10): the HF anchor, ours in bf16 and with MXFP4-resident experts at 4096, MXFP4 at 2048.
    "small": [_c("hf", 4096, True, "flex_attention", "qkvo16"),
              _c("ours", 4096, True, "auto", "preset", compile=True),
              _c("ours", 4096, True, "auto", "preset", compile=True, base="mxfp4"),
              _c("ours", 2048, True, "auto", "preset", compile=True, base="mxfp4"),
              _c("ours", 4096, True, "auto", "preset", base="mxfp4")],
    # Issue 11: the longest sequences on one 80 GB card (run under a 79 GiB cap), bf16 and MXFP4 experts, near the
    # estimator's limits (86,016 and past 131,072 at 79 GiB); and the row the cookbook's packed 2048 compares with.
    "long": [_c("ours", 65536, True, "auto", "preset", compile=True),
             _c("ours", 65536, True, "auto", "preset", compile=True, base="mxfp4"),
             _c("ours", 86016, True, "auto", "preset", compile=True),
             _c("ours", 131072, True, "auto", "preset", compile=True, base="mxfp4"),
             _c("ours", 98304, True, "auto", "preset", compile=True, base="mxfp4"),
             # activation offload (train.offload_activations): past the limits above
             _c("ours", 98304, True, "auto", "preset", compile=True, offload=True),
             _c("ours", 131072, True, "auto", "preset", compile=True, base="mxfp4", offload=True),
             # bf16 experts between 65,536 (trains) and 86,016 (out of memory): where the limit lies
             _c("ours", 76800, True, "auto", "preset", compile=True)],
    "cookbook": [_c("ours", 2048, True, "auto", "preset", compile=True),
                 _c("ours", 2048, True, "auto", "preset", compile=True, batch=4)],  # the recipe's 4 blocks a step
    # Issue 10's speed goal, after the Triton decode: the anchor, bf16 and MXFP4 experts compiled, MXFP4 at 2048 (the
    # 16 GB card's length), bf16 uncompiled (issue 11's anomaly).
    "mxfp4": [_c("hf", 4096, True, "flex_attention", "qkvo16"),
              _c("ours", 4096, True, "auto", "preset", compile=True),
              _c("ours", 4096, True, "auto", "preset", compile=True, base="mxfp4"),
              _c("ours", 2048, True, "auto", "preset", compile=True, base="mxfp4"),
              _c("ours", 4096, True, "auto", "preset")],
    # CPU smoke: tiny shapes (see SMOKE_SHAPE), eager only; checks that every code path runs.
    "smoke": [_c("ours", 64, True, "auto", "preset"), _c("hf", 64, False, "eager", "qkvo16"),
              _c("ours", 40, True, "auto", "preset", pad_to=64), _c("ours", 64, True, "auto", "preset", base="mxfp4"),
              _c("ours", 64, True, "auto", "preset", offload=True)],
}
SMOKE_SHAPE = dict(layers=2, experts=4, hidden=64, heads=4, kv_heads=2, head_dim=32)
SMOKE_OVERRIDES = ["train.lora.expert_layers=[1]"]  # the preset's layers 7/15/23 do not exist in 2 layers


def train_config(case: Case, preset: str, extra: list[str]) -> TrainConfig:
    """The TrainConfig our pipeline would run for this case (DeepSpeed off: the bench runs no DeepSpeed)."""
    ckpt = str(case.checkpointing).lower()
    overrides = [f"train.data.max_length={case.length}", f"train.gradient_checkpointing={ckpt}",
                 f"train.attention={case.attention}", "train.deepspeed.enabled=false",
                 f"train.optim.micro_batch_size={case.batch}", f"train.base_weights={case.base}"]
    if case.lora == "qkvo16":
        overrides += ["train.lora.r=16", "train.lora.alpha=32", "train.lora.expert_parameters=[]"]
    if case.compile:
        overrides.append("train.compile=true")
    if case.offload:
        overrides.append("train.offload_activations=true")
    return load_recipe(preset, overrides + extra).train


def build(case: Case, cfg: TrainConfig, config: Any, device: str) -> tuple[Any, str]:
    on_gpu = device == "cuda"
    if case.setup == "ours":
        attention = choose_attention(cfg.attention, "gpt_oss", on_gpu)
        model = build_random_model(config, attention, device, base_weights=case.base)
        return prepare_model(model, cfg), attention
    from peft import LoraConfig, get_peft_model

    model = build_random_model(config, case.attention, device)
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=BASELINE_TARGETS,
                          task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg), case.attention


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(case: Case, cfg: TrainConfig, config: Any, device: str, warmup: int, steps: int,
            profile: bool = False) -> dict[str, Any]:
    """Build, then time warmup + steps training steps. Everything it allocates dies with its frame."""
    t0 = time.perf_counter()
    model, attention = build(case, cfg, config, device)
    model.train()  # checkpointing and flex's training kernels act only in train mode
    trainable, total = model.get_nb_trainable_parameters()
    row: dict[str, Any] = {"build_s": round(time.perf_counter() - t0, 1), "attention_impl": attention,
                           "experts_impl": getattr(model.config, "_experts_implementation", None),
                           "trainable_params": trainable, "total_params": total}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak from here on includes the weights (still allocated)
    def step() -> tuple[float, float]:
        # fresh routing each step
        ids = torch.randint(0, 199_998, (case.batch, case.length), device=device, generator=gen)
        batch: dict[str, torch.Tensor] = {"input_ids": ids, "labels": ids.clone()}
        if case.pad_to:
            batch["attention_mask"] = torch.ones_like(ids)
            batch["attention_mask"][:, case.seq:] = 0
            batch["labels"][:, case.seq:] = -100
        _sync(device)
        t = time.perf_counter()
        with saved_tensors_place(cfg):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t, loss.item()

    times, losses = zip(*(step() for _ in range(warmup + steps)), strict=True)
    step_s = statistics.median(times[warmup:])
    row.update(first_step_s=round(times[0], 3), step_s=round(step_s, 4),
               tokens_per_s=round(case.batch * case.seq / step_s, 1),
               loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), steps_timed=steps)
    if profile:
        row["profile"] = profile_step(step, device)
    return row


def run_case(case: Case, cfg: TrainConfig, config: Any, device: str, warmup: int, steps: int,
             profile: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"status": "ok"}
    try:
        row.update(measure(case, cfg, config, device, warmup, steps, profile))
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as exc:  # one failed row must not lose the others
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        row["status"] = f"error: {type(exc).__name__}: {first}"
    gc.collect()
    if device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)  # at the failure, for an OOM row
        row["reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def predicted(cfg: TrainConfig, arch: Architecture, gpu_gib: float | None, on_gpu: bool,
              plain_hf: bool) -> dict[str, Any]:
    # The random model is MXFP4 exactly when the row asks for it (built in memory, no checkpoint to read).
    arch = dataclasses.replace(arch, mxfp4_experts=cfg.base_weights == "mxfp4")
    est = estimate(cfg, arch, gpu_gib, 1, on_gpu=on_gpu, search_fix=False, plain_hf=plain_hf)
    return {"est_peak_gib": round(est.peak_allocated_gib, 2), "est_total_gib": round(est.total_gib, 2),
            "est_peak_at": str(est.peak_at), "est_fits": est.fits, "est_trainable": est.trainable_params}


def error_pct(pred: float | None, measured: float | None) -> float | None:
    """Signed error of the prediction against the measurement, in % of the measurement."""
    if pred is None or not measured:
        return None
    return round(100 * (pred - measured) / measured, 1)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """tokens/s of each row over the best plain-HF row at the same sequence length (same card, same process)."""
    for row in rows:
        base = [r["tokens_per_s"] for r in rows if r["setup"] == "hf" and r["seq"] == row["seq"]
                and r.get("tokens_per_s")]
        row["x_best_hf"] = round(row["tokens_per_s"] / max(base), 2) if base and row.get("tokens_per_s") else None


def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (f"{meta['device']} ({meta['gpu_gib'] and round(meta['gpu_gib'], 1)} GiB), {meta['date']}, torch "
            f"{meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}; micro batch 1 (else the seq "
            f"column says B x seq), AdamW, "
            f"median of {meta['steps']} steps after {meta['warmup']} warm-up\n\n")
    cols = ["setup", "LoRA", "attention", "ckpt", "seq", "trainable", "peak GiB", "est. GiB", "est. err",
            "step s", "tokens/s", "x best HF", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        err = r.get("est_err_pct")
        seq = f"{r['seq']} (pad {r['pad_to']})" if r.get("pad_to", 0) > 1 else str(r["seq"])
        seq = f"{r['batch']} x {seq}" if r.get("batch", 1) > 1 else seq
        setup = setup_label(r)
        cells = [setup, r["lora"], r.get("attention_impl") or r["attention"],
                 "on" if r["checkpointing"] else "off", seq, _fmt(r.get("trainable_params"), ","),
                 _fmt(r.get("peak_gib"), ".2f"), _fmt(r.get("est_peak_gib"), ".2f"),
                 "-" if err is None else f"{err:+.1f} %", _fmt(r.get("step_s"), ".3f"),
                 _fmt(r.get("tokens_per_s"), ",.0f"), _fmt(r.get("x_best_hf"), ".2f"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="core")
    parser.add_argument("--only", type=int, nargs="*", help="indices into the grid to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--tag", default="train", help="output names: bench_<tag>.json / .md")
    parser.add_argument("--append", action="store_true", help="keep the rows already in bench_<tag>.json")
    parser.add_argument("--preset", default=PRESET)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra train.* overrides "
                        "for the 'ours' rows' TrainConfig")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    parser.add_argument("--profile", action="store_true", help="profile one more step of each row (kernel table)")
    parser.add_argument("--same-process", action="store_true", help="run every row in this process; by default "
                        "each row has a process of its own, so that no row inherits compile caches, allocator "
                        "state or a warm GPU from the rows before it")
    args = parser.parse_args(argv)
    if args.grid != "smoke" and not torch.cuda.is_available():
        parser.error("the real 20b shape needs a GPU; use --grid smoke on the CPU")
    return args


def child_argv(args: argparse.Namespace, index: int) -> list[str]:
    """The command line of the process that runs row `index` alone and appends it to the results."""
    argv = [sys.executable, "-m", "bench.train", "--grid", args.grid, "--only", str(index), "--append",
            "--same-process", "--out", str(args.out), "--tag", args.tag, "--preset", args.preset,
            "--warmup", str(args.warmup), "--steps", str(args.steps)]
    argv += [f"--set={o}" for o in args.overrides] + (["--profile"] if args.profile else [])
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = args.grid == "smoke"
    # Many (shape, mask) combinations: keep dynamo from silently falling back to uncompiled flex attention.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)

    import peft
    import transformers

    config = gpt_oss_20b_config(**SMOKE_SHAPE) if smoke else gpt_oss_20b_config()
    arch = Architecture.from_config_json(config.to_dict())
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if device == "cuda" else None
    extra = args.overrides + (SMOKE_OVERRIDES if smoke else [])
    meta = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU", "gpu_gib": gpu_gib,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "grid": args.grid,
            "preset": args.preset, "overrides": extra, "warmup": args.warmup, "steps": args.steps,
            "process_per_row": not args.same_process,
            "arch_is_builtin_20b": dataclasses.replace(arch, mxfp4_experts=True)
            == BUILTIN_ARCHITECTURES["openai/gpt-oss-20b"]}
    indices = list(range(len(GRIDS[args.grid]))) if args.only is None else args.only
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"bench_{args.tag}.json"
    if not args.append:
        json_path.unlink(missing_ok=True)

    def record(row: dict[str, Any]) -> None:
        """Add a row to the results on disk (rows of other processes included), written after every row: a
        run cut short still leaves what it measured."""
        rows = json.loads(json_path.read_text())["rows"] if json_path.is_file() else []
        rows.append(row)
        add_ratios(rows)
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / f"bench_{args.tag}.md").write_text(markdown(rows, meta))

    t_start = time.perf_counter()
    for index in indices:
        case = GRIDS[args.grid][index]
        cfg = train_config(case, args.preset, extra if case.setup == "ours" else [])
        row = {**asdict(case), "name": case.name}
        row.update(predicted(cfg, arch, gpu_gib, device == "cuda", plain_hf=case.setup == "hf"))
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            row["status"] = "skipped (time budget)"
        elif not args.same_process:
            print(f"--- {case.name} (own process)", flush=True)
            if subprocess.run(child_argv(args, index)).returncode == 0:
                continue  # the child recorded its row
            row["status"] = "error: the row's process failed (see its output above)"
        else:
            print(f"--- {case.name}", flush=True)
            row.update(run_case(case, cfg, config, device, args.warmup, args.steps, args.profile))
            if row["status"] == "ok":
                row["est_err_pct"] = error_pct(row["est_peak_gib"], row.get("peak_gib"))
            print(json.dumps(row), flush=True)
        record(row)
    if json_path.is_file():
        print("\n" + (args.out / f"bench_{args.tag}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
