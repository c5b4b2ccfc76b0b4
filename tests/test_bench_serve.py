"""bench/serve.py on the CPU: the smoke run drives the real vLLM CPU engine through every stage (four engine starts,
two hot-loaded adapters, vLLM's own benchmark, a merge of an MXFP4 base with expert LoRA and one of attention LoRA,
HF generate and HF+peft against the hot-loaded and the merged adapter's greedy tokens),
with an extra engine argument passed through; the time budget skips what cannot start."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys

import pytest
from serve_fixtures import free_port

from bench.serve import (
    HF_WAYS,
    Context,
    Session,
    engine_args_applied,
    greedy_hf,
    greedy_prompts,
    hf_generate_tokens,
    main,
    make_adapter,
    percentile,
    quickest_start_s,
    run_session,
    time_hf_way,
)

pytestmark = pytest.mark.slow

STAGES = ["base", "hotload_attn", "hotload_experts", "vllm_bench", "warm", "merge", "merged", "merge_attn",
          "merged_attn", "hf"]
SERVED = ["base", "hotload_attn", "hotload_experts", "warm", "merged", "merged_attn"]
MEMORIZE = "bench/data/memorize.jsonl"  # what the GPU run trains its adapter on (bench/gpu/run.sh memorize)


def test_smoke_measures_every_stage(tmp_path):
    from transformers import AutoTokenizer

    from gptoss_webui.sources import resolve_model

    out = tmp_path / "out"
    # A port of its own: an engine another checkout runs on the default port would answer our health checks.
    proc = subprocess.run([sys.executable, "-m", "bench.serve", "--smoke", "--out", str(out),
                           "--port", str(free_port()), "--engine-arg", "seed=7", "--greedy-data", MEMORIZE],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench_serve.json").read_text())
    rows = {r["stage"]: r for r in data["rows"]}
    assert list(rows) == STAGES
    assert all(r["status"] == "ok" and "chat_error" not in r for r in rows.values()), data["rows"]
    base, warm, merged, bench, hf = rows["base"], rows["warm"], rows["merged"], rows["vllm_bench"], rows["hf"]
    assert base["model"] == "tiny-dense" and base["lora_enabled"] and base["start_s"] > 0
    # the extra engine argument reached vLLM in every engine start
    assert base["engine_args"] == warm["engine_args"] == merged["engine_args"] == rows["merged_attn"]["engine_args"] \
        == {"seed": True}
    assert warm["start_warm_s"] > 0 and warm["start_s"] == base["start_s"]

    for stage in ("hotload_attn", "hotload_experts"):  # hot-load request -> first streamed token, 10 tries
        row = rows[stage]
        tries = row["adapter_to_first_token_s"]
        assert len(tries) == 10 and all(t > 0 for t in tries)
        assert min(tries) <= row["adapter_to_first_token_p50_s"] <= max(tries)
        assert row["adapter_to_first_token_p50_s"] == pytest.approx(statistics.median(tries), abs=1e-3)
        assert 0 < row["hotload_s"] <= tries[0] and row["adapter_changed"], row["check"]
        assert row["model"] == "adp"
    assert rows["hotload_attn"]["adapter"] == "r8 k,o,q,v"
    assert rows["hotload_experts"]["adapter"] == "r8 down,gate,k,o,q,up,v"  # the dense stand-in for experts

    for stage in SERVED:  # streamed chat, then throughput at 1 and 4 streams
        row = rows[stage]
        assert row["ttft_s"] > 0 and row["chat_tokens"] == 16 and row["chat_chunks"] > 1, stage
        assert 0 < row["itl_p50_ms"] <= row["itl_p90_ms"], stage
        assert list(row["throughput"]) == ["1", "4"]
        for count, t in row["throughput"].items():
            requests = max(int(count), 2)
            assert (t["streams"], t["requests"], t["out_tokens"]) == (int(count), requests, requests * 16)
            assert t["out_tok_s"] > 0 and t["total_tok_s"] > t["out_tok_s"] and 0 < t["p50_s"] <= t["max_s"]
            assert row["out_tok_s"][count] == t["out_tok_s"]
            # decode throughput from vLLM's own histograms, over exactly this count's requests
            assert t["timed_requests"] == requests and t["tpot_ms"] > 0 and t["ttft_mean_s"] > 0
            assert t["decode_tok_s"] == pytest.approx(int(count) * 1000 / t["tpot_ms"], rel=1e-2)
            assert row["decode_tok_s"][count] == t["decode_tok_s"]
        if stage != "base":
            reference = warm if stage.startswith("merged") else base
            assert row["base_row"] == reference["stage"]
            for count, ratio in row["ratio_to_base"].items():
                assert ratio > 0
                assert ratio == pytest.approx(row["out_tok_s"][count] / reference["out_tok_s"][count], abs=2e-3)
            assert row["decode_ratio_to_base"].keys() == row["ratio_to_base"].keys()
            for count, ratio in row["decode_ratio_to_base"].items():
                assert ratio == pytest.approx(row["decode_tok_s"][count] / reference["decode_tok_s"][count], abs=2e-3)

    # vLLM's own benchmark on the same engine, and our base row's ratio to it
    assert bench["command"].startswith("vllm bench serve --backend vllm")
    assert "--dataset-name random" in bench["command"] and "--max-concurrency 4" in bench["command"]
    for count in ("1", "4"):
        assert bench["vllm_bench"][count]["completed"] == max(int(count), 2)
        assert bench["out_tok_s"][count] > 0
        assert bench["ours_to_vllm_bench"][count] == pytest.approx(base["out_tok_s"][count] / bench["out_tok_s"][count],
                                                                   abs=2e-3)

    merge = rows["merge"]  # the MXFP4 base with expert LoRA, merged and checked against HF+peft
    assert merge["model"] == "demo:tiny-gpt-oss-mxfp4" and merge["adapter"] == "r8 k,o,q,v + experts of layers 1"
    assert merge["merge_ok"] and not merge["merge_reused"] and merge["merge_s"] > 0
    assert merge["merge_max_abs_diff"] < 1e-4 and merge["adapter_effect"] > 1e-2
    assert merge["merge_experts"].startswith("float32 (the adapter changes the experts")
    assert not merged["lora_enabled"] and any("reused the merged model" in n for n in merged["notes"])
    assert any("MoE backend" in b for b in merged["backends"])
    # the greedy probes: the prompts of the dataset, as training tokenized them, up to the assistant's turn
    prompts = greedy_prompts("demo:tiny-gpt-oss-mxfp4", MEMORIZE)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("demo:tiny-gpt-oss-mxfp4"))
    assert len(prompts) == 5 and all(tokenizer.decode(p).endswith("<|start|>assistant") for p in prompts)
    assert "How do I keep basil alive" in tokenizer.decode(prompts[1])
    for row in (merged, rows["hotload_experts"]):
        assert row["greedy"]["prompts"] == prompts and [len(t) for t in row["greedy"]["tokens"]] == [32] * 5
    assert merged["greedy"]["model"] == "demo:tiny-gpt-oss-mxfp4"
    assert rows["hotload_experts"]["greedy"]["model"] == "demo:tiny-dense"

    # the attention-only adapter merged: the fp32 demo here (the CPU has no MXFP4 kernel), the base's dtype kept
    assert rows["merge_attn"]["model"] == "demo:tiny-gpt-oss" and rows["merge_attn"]["adapter"] == "r8 k,o,q,v"
    assert rows["merge_attn"]["merge_ok"] and rows["merge_attn"]["merge_experts"] == "float32"
    assert rows["merged_attn"]["adapter"] == "r8 k,o,q,v" and not rows["merged_attn"]["lora_enabled"]

    # HF generate after the engines stopped, and HF+peft against the merged engine's greedy tokens
    assert hf["hf_streams"] == 4 and list(hf["hf"]) == ["generate", "greedy_loop"]
    assert hf["engine_row"] == "warm" and hf["engine_tok_s"] == warm["out_tok_s"]["4"]
    assert "use_cache True" in hf["hf_note"]
    for way, got in hf["hf"].items():  # tiny-dense has no experts module
        assert got["out_tokens"] == 4 * 16 and got["out_tok_s"] > 0 and got["experts"] == {}
        assert hf["engine_to_hf"][way] == pytest.approx(hf["engine_tok_s"] / got["out_tok_s"], abs=0.01)
    assert list(hf["greedy_vs_peft"]) == ["hotload_experts", "merged"]  # the hot-loaded and the merged adapter
    for greedy in hf["greedy_vs_peft"].values():  # fp32 throughout: the same tokens
        assert (greedy["equal"], greedy["of"], greedy["tokens"]) == (5, 5, 32) and greedy["first_diff"] == [None] * 5
        assert len(greedy["min_top2_gap"]) == 5 and all(g >= 0 for g in greedy["min_top2_gap"])

    assert data["meta"]["device"] == "CPU" and data["meta"]["vllm"].startswith("vllm")
    assert sorted(p.name for p in out.iterdir()) == ["bench_serve.json", "bench_serve.md", "engine_base.log",
                                                     "engine_merged.log", "engine_merged_attn.log", "engine_warm.log",
                                                     "hf.log", "merge.log", "vllm_bench.log"]
    table = (out / "bench_serve.md").read_text()
    assert table.count("| ok |") == len(STAGES) and table in proc.stdout
    for way, got in hf["hf"].items():
        assert f"| hf {way} | - | - | {got['out_tok_s']} | {hf['engine_to_hf'][way]} |" in table
    decode = base["decode_tok_s"]
    assert f"| base | {decode['1']} | - | {decode['4']} | - |" in table.split("Decode tokens/s")[1]


def test_profile_keeps_the_engines_kernel_table(tmp_path):
    """--profile: one more batch per served row under vLLM's own torch profiler, its operator table kept in --out
    (the traces stay behind: on the GPU they run to hundreds of MB)."""
    assert main(["--smoke", "--stages", "base", "--profile", "--out", str(tmp_path), "--port", str(free_port())]) == 0
    row = json.loads((tmp_path / "bench_serve.json").read_text())["rows"][0]
    assert row["status"] == "ok" and row["profile"] == "profile_base.txt", row
    table = (tmp_path / "profile_base.txt").read_text()
    assert "Self CPU" in table and "execute_context" in table  # the engine's steps, recorded in its worker
    assert not list(tmp_path.glob("*.pt.trace.json*"))
    assert "vLLM's profiler over one batch at the largest stream count: profile_base.txt" in (
        tmp_path / "bench_serve.md").read_text()


def test_budget_skips_what_cannot_start(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path), "--budget-s", "1"]) == 0
    rows = json.loads((tmp_path / "bench_serve.json").read_text())["rows"]
    assert [(r["stage"], r["status"]) for r in rows] == [(s, "skipped (time budget)") for s in STAGES]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_serve.json", "bench_serve.md"]


def test_a_failing_merge_is_recorded_not_raised(tmp_path):
    rows = []
    missing = str(tmp_path / "no-adapter")
    session = Session("merged", ("merge", "merged"), "demo:tiny-gpt-oss", {"merge": missing, "merged": missing})
    args = argparse.Namespace(out=tmp_path, row_s=0.0, engine_arg=[], engine_env=[], sample_stacks=False)
    ctx = Context(lambda: math.inf, rows, [], "demo:tiny-dense", "demo:tiny-gpt-oss", missing)
    started = run_session(session, args, tmp_path, ctx, 0.0, rows.append)
    assert started is None and [r["stage"] for r in rows] == ["merge", "merged"]
    assert rows[0]["status"].startswith("error: ") and "not a LoRA adapter folder" in rows[0]["status"]
    assert rows[1]["status"] == "error: no merged model (the merge row failed)"


def test_a_run_after_another_keeps_time_for_its_engine_start(tmp_path):
    """--previous's quickest start (a warm one) is what the first start of the next run plans with: a merge that would
    leave the merged engine less than that is skipped, not run into a start that cannot finish (2026-12-01: 3 s)."""
    previous = [{"stage": "base", "status": "ok", "start_s": 156.5},
                {"stage": "warm", "status": "ok", "start_s": 151.6, "start_warm_s": 53.1},
                {"stage": "merged", "status": "error: EngineError", "start_s": None}]
    assert quickest_start_s(previous) == 53.1 and quickest_start_s([]) == 0.0
    rows = []
    adapter = str(tmp_path / "adapter")
    session = Session("merged", ("merge", "merged"), "demo:tiny-gpt-oss", {"merge": adapter, "merged": adapter})
    args = argparse.Namespace(out=tmp_path, row_s=0.0, engine_arg=[], engine_env=[], sample_stacks=False)
    ctx = Context(lambda: 100.0, rows, previous, "demo:tiny-dense", "demo:tiny-gpt-oss", adapter)
    assert run_session(session, args, tmp_path, ctx, quickest_start_s(previous), rows.append) is None
    assert [(r["stage"], r["status"]) for r in rows] == [("merge", "skipped (time budget)"),
                                                         ("merged", "skipped (time budget)")]


def test_engine_args_are_read_back_from_vllms_log(tmp_path):
    """vLLM logs its non-default args as a Python dict; a JSON-valued argument comes back as its whole config."""
    from types import SimpleNamespace

    log = tmp_path / "engine.log"
    log.write_text("(APIServer pid=1) INFO [api_utils.py:273] non-default args: {'port': 8011, 'seed': 7, "
                   "'moe_backend': 'marlin', 'compilation_config': {'mode': None, 'cudagraph_specialize_lora': False, "
                   "'pass_config': {}}}\n")
    engine = SimpleNamespace(info=SimpleNamespace(log_path=str(log)))
    asked = ["seed=7", "moe-backend=marlin", 'compilation-config={"cudagraph_specialize_lora":false}',
             'compilation-config={"cudagraph_specialize_lora":true}', "moe-backend=triton", "enforce-eager"]
    applied = [engine_args_applied(engine, argparse.Namespace(engine_arg=[a])) for a in asked]
    assert [next(iter(a.values())) for a in applied] == [True, True, True, False, False, False]


def test_adapters_are_built_from_the_config_alone(tmp_path):
    """make_adapter builds on the meta device (no weight read: the 20b costs nothing) what peft loads."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from gptoss_webui.sources import resolve_model

    path = make_adapter("demo:tiny-gpt-oss-mxfp4", tmp_path / "experts", "experts")
    tensors = load_file(f"{path}/adapter_model.safetensors")
    assert len(tensors) == 20 and all(t.abs().sum() > 0 for t in tensors.values())  # 16 attention + 4 expert
    assert tuple(tensors["base_model.model.model.layers.1.mlp.experts.lora_A.weight"].shape) == (32, 64)
    assert make_adapter("demo:tiny-gpt-oss-mxfp4", tmp_path / "experts", "attn") == path  # reused as it is
    model = AutoModelForCausalLM.from_pretrained(resolve_model("demo:tiny-dense"), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(model, make_adapter("demo:tiny-dense", tmp_path / "mlp", "mlp"))
    ids = torch.tensor([[13225, 2375, 11, 495]])
    with torch.no_grad():
        changed = tuned(input_ids=ids).logits
        with tuned.disable_adapter():
            assert (tuned(input_ids=ids).logits - changed).abs().max() > 1e-2
    # greedy_hf with the KV cache against one forward over prompt + its tokens: the same argmax at every step, and the
    # smallest top-2 gap it reports is that forward's
    gaps: list[float] = []
    tokens = greedy_hf(tuned, ids.tolist(), 6, "cpu", gaps)[0]
    with torch.no_grad():
        steps = tuned(input_ids=torch.tensor([ids[0].tolist() + tokens])).logits[0, ids.shape[1] - 1:-1]
    top2 = steps.topk(2, dim=-1).values
    assert steps.argmax(-1).tolist() == tokens and len(gaps) == 1
    assert gaps[0] == pytest.approx(float((top2[:, 0] - top2[:, 1]).min()), abs=1e-4)
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5 and percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert percentile([], 50) is None


def test_hf_ways_decode_the_same_tokens_and_say_which_experts_ran():
    """The hf row's two ways (transformers' generate() and our greedy loop) are timed on the same greedy decoding: on
    the tiny gpt-oss both give the same tokens, and each says which expert implementation every forward pass ran by
    its token count (the prefill of 2 x 5 tokens, then 2 a step; on the CPU generate() keeps grouped_mm)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gptoss_webui.sources import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("demo:tiny-gpt-oss"), dtype=torch.float32).eval()
    prompts = [[13225, 2375, 11, 495, 7], [200, 300, 400, 500, 600]]
    assert hf_generate_tokens(model, prompts, 6, "cpu") == greedy_hf(model, prompts, 6, "cpu")
    for way in HF_WAYS:
        row = time_hf_way(way, model, prompts, 6, "cpu")
        assert row["out_tokens"] == 12 and row["out_tok_s"] > 0
        assert row["experts"] == {"grouped_mm": [2, 10]}
