"""The serving pipeline against the real vLLM CPU build (no mocks), in one module that shares its engine
starts (each costs 30-60 s on 2 cores, more when the CPU is busy). The tests run in file order:

1. faults and the CLI: an impossible config is explained from the log; Ctrl-C on `serve` while it starts
   stops the engine; `serve` on a busy port takes another one and says so (strict: refuses);
2. the tiny dense model with LoRA on, started by the CLI, driven through an Engine attached to it (what
   a restarted UI does): hot-loaded adapters give HF+peft's greedy tokens, a no-op adapter is flagged,
   an adapter of another base is refused and the engine stays up, unload works;
3. the engine process is killed in the middle of a chat: the chat gets a clear error, both the CLI and
   the attached Engine see the crash, no vLLM process is left, and the same Engine restarts -- on the
   merged gpt-oss, which the remaining tests use;
4. a gpt-oss adapter (attention + expert parameters): auto mode merges instead of hot-loading (vLLM's
   CPU LoRA path dies on MoE) and says why; the merge reproduces HF+peft; the merged engine streams
   harmony chat whose greedy tokens equal HF's, with the analysis channel arriving as reasoning.

Each fixture brings the shared engine to the state its tests need, so any test also runs alone (slower).
The gpt-oss base is the demo model rewired to answer in harmony structure (serve_fixtures.
make_scripted_gpt_oss): a random model never opens an analysis channel, so reasoning would go untested.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from serve_fixtures import (
    HARMONY_LOOP,
    PROMPT_IDS,
    THOUGHT,
    cpu_serve_config,
    free_port,
    hf_greedy,
    load_hf,
    make_adapter,
    make_scripted_gpt_oss,
    pids_alive,
    private_workspace,
)

from gptoss_webui.serve import plan
from gptoss_webui.serve.chat import CUT_OFF, CancelToken, ChatClient, ChatError, SamplingParams
from gptoss_webui.serve.engine import Engine
from gptoss_webui.serve.merge import PROVENANCE_FILE, previous_merge
from gptoss_webui.serve.procs import port_free
from gptoss_webui.serve.state import EngineError
from gptoss_webui.sources import resolve_model

pytestmark = pytest.mark.slow
NEW_TOKENS = 8
QUESTION = [{"role": "system", "content": "Answer like a pirate."},
            {"role": "user", "content": "What is the capital of France?"}]


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_dir() -> str:
    return resolve_model("demo:tiny-dense")


@pytest.fixture(scope="module")
def adapters(dense_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-adapters")
    tuned = make_adapter(dense_dir, root / "tuned", scale=0.5)
    noop = make_adapter(dense_dir, root / "noop", scale=0.0)  # peft's init: lora_B = 0
    return {"tuned": tuned, "noop": noop}


@pytest.fixture(scope="module")
def reference(dense_dir, adapters):
    """HF greedy continuations of PROMPT_IDS: base, and base + the tuned adapter through peft."""
    return {"base": hf_greedy(load_hf(dense_dir), PROMPT_IDS, NEW_TOKENS),
            "tuned": hf_greedy(load_hf(dense_dir, adapters["tuned"]), PROMPT_IDS, NEW_TOKENS)}


@pytest.fixture(scope="module")
def busy_port():
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def cli_serve(ws: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    """`python -m gptoss_webui serve ...` with its output in a file, as a user would start it."""
    out = ws / "cli.out"
    small = ["--set", "enforce_eager=true", "--set", "cpu_kv_cache_gib=1", "--set", "max_model_len=512",
             "--set", "dtype=float32", "--set", "start_timeout_s=300"]
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "gptoss_webui", "serve", *flags, *small], stdout=fh,
                                stderr=subprocess.STDOUT, env={**os.environ, "GPTOSS_WORKSPACE": str(ws)})
    return proc, out


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def read_until_error(stream) -> list[ChatError]:
    """Consume a chat stream; the ChatError that ended it, if one did."""
    try:
        for _ in stream:
            pass
    except ChatError as exc:
        return [exc]
    return []


@pytest.fixture(scope="module")
def cli(tmp_path_factory, busy_port):
    """The CLI serving the dense model, asked for a busy port; stopped with Ctrl-C unless it ended."""
    ws = private_workspace(tmp_path_factory.mktemp("cli") / "ws")
    proc, out = cli_serve(ws, "--model", "demo:tiny-dense", "--port", str(busy_port))
    wait_for(lambda: "Ctrl-C stops the engine" in out.read_text() or proc.poll() is not None, 400,
             "the CLI to serve")
    assert proc.poll() is None, out.read_text()
    proc.engine_pid = json.loads((ws / "engine.json").read_text())["pid"]
    yield proc, out, ws
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


@pytest.fixture(scope="module")
def shared(cli):
    """The module's Engine object -- attached to the engine the CLI started, as a restarted UI would be."""
    _proc, _out, ws = cli
    engine = Engine(ws / "engine.json")
    engine.progress_messages = []
    yield engine
    engine.stop()


@pytest.fixture
def engine(shared, busy_port):
    """The shared engine serving the tiny dense model with LoRA enabled."""
    if not (shared.status().state == "running" and shared.info.model_type == "llama"):
        shared.stop()
        shared.start(cpu_serve_config("demo:tiny-dense", port=busy_port))
    return shared


@pytest.fixture(scope="module")
def oss_base(tmp_path_factory) -> str:
    return str(make_scripted_gpt_oss(tmp_path_factory.mktemp("base") / "scripted-gpt-oss"))


@pytest.fixture(scope="module")
def oss_adapter(oss_base, tmp_path_factory):
    return make_adapter(oss_base, tmp_path_factory.mktemp("oss") / "pirate", experts=True, scale=0.3)


def start_oss(engine: Engine, oss_base: str, oss_adapter) -> None:
    engine.progress_messages.clear()
    engine.start(cpu_serve_config(oss_base), adapters={"pirate": str(oss_adapter)},
                 progress=engine.progress_messages.append)


@pytest.fixture
def oss_engine(shared, oss_base, oss_adapter):
    """The shared engine serving the gpt-oss adapter merged into its base (auto mode on the CPU)."""
    if not (shared.status().state == "running" and shared.info.served_name == "pirate"):
        shared.stop()
        start_oss(shared, oss_base, oss_adapter)
    return shared


# --- 1. faults ------------------------------------------------------------------------------------

def test_impossible_config_reports_the_cause(tmp_path):
    engine = Engine(tmp_path / "engine.json")
    started = time.time()
    with pytest.raises(EngineError) as err:
        engine.start(cpu_serve_config("demo:tiny-dense", max_model_len=99999, start_timeout_s=180))
    message = str(err.value)
    assert "max_model_len 99999 is longer than the model's context (4096 tokens)" in message
    assert "Traceback" not in message
    assert time.time() - started < 180
    info = engine.status()
    assert info.state == "crashed" and "max_model_len" in info.error
    assert not pids_alive([info.pid]) and port_free(info.host, info.port)


def test_ctrl_c_while_starting_stops_the_engine(tmp_path):
    ws = private_workspace(tmp_path / "ws")
    proc, out = cli_serve(ws, "--model", "demo:tiny-dense", "--port", str(free_port()))
    state = ws / "engine.json"
    wait_for(lambda: state.is_file() and json.loads(state.read_text()).get("pid"), 60, "the engine process")
    pid = json.loads(state.read_text())["pid"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, out.read_text()
    assert "stopping the engine" in out.read_text()
    info = json.loads(state.read_text())
    assert info["state"] == "stopped" and not pids_alive([pid]) and port_free(info["host"], info["port"])


def test_cli_serve_prints_the_url_and_models(cli, busy_port):
    proc, out, _ws = cli
    text = out.read_text()
    assert f"note: port {busy_port} was in use; the engine listens on" in text
    assert "OpenAI base URL: http://127.0.0.1:" in text and "models: tiny-dense" in text


def test_a_second_cli_serve_hot_loads_into_the_running_engine(cli, engine, adapters):
    """One engine per workspace, shared by the CLI and the UI: `serve --adapter` while it runs loads the adapter
    into it (the UI then lists it too) instead of starting a second engine; another model is refused."""
    _proc, _out, ws = cli
    second, out = cli_serve(ws, "--model", "demo:tiny-dense", "--adapter", f"tuned={adapters['tuned']}")
    assert second.wait(240) == 0, out.read_text()
    text = out.read_text()
    assert "adapter 'tuned' loaded; it changes the model's output" in text and "models: " in text
    assert "tuned" in engine.status().adapters and "tuned" in engine.models()
    engine.unload_adapter("tuned")
    other, out = cli_serve(ws, "--model", "demo:tiny-gpt-oss")
    assert other.wait(120) == 2, out.read_text()
    assert "error: an engine is already running in this workspace: " in out.read_text()
    assert "stop it first" in out.read_text()


def test_busy_port_picks_another_and_says_so(engine, busy_port):
    info = engine.status()
    assert info.state == "running"
    assert info.port != busy_port
    assert any(f"port {busy_port} was in use" in note for note in info.notes)


def test_strict_port_refuses_a_busy_port(tmp_path, busy_port):
    with pytest.raises(EngineError, match=f"port {busy_port} .* already in use"):
        Engine(tmp_path / "engine.json").start(cpu_serve_config("demo:tiny-dense", port=busy_port),
                                               strict_port=True)


# --- 2. hot-load on the dense model ------------------------------------------------------------------

def test_second_start_is_refused(engine):
    with pytest.raises(EngineError, match="already running"):
        engine.start(cpu_serve_config("demo:tiny-dense"))


def test_hotload_matches_hf_peft_and_unloads(engine, adapters, reference):
    info = engine.status()
    assert info.lora_enabled and info.model_type == "llama"
    base = engine.complete(info.served_name, PROMPT_IDS, NEW_TOKENS)["choices"][0]["token_ids"]
    assert base == reference["base"]

    check = engine.load_adapter("tuned", adapters["tuned"])
    assert check.changed, check.message
    assert "tuned" in engine.models() and engine.status().adapters == {"tuned": str(adapters["tuned"])}
    tuned = engine.complete("tuned", PROMPT_IDS, NEW_TOKENS)["choices"][0]["token_ids"]
    assert tuned != base
    assert tuned == reference["tuned"]

    # Streaming chat through the openai client reaches the adapter too.
    client = ChatClient.for_engine(engine)
    replies = list(client.compare("Hello", [info.served_name, "tuned"],
                                  SamplingParams(temperature=0.0, max_tokens=6)))
    final = replies[-1]
    assert all(r.done and r.error is None and r.content for r in final.values())
    assert final[info.served_name].content != final["tuned"].content

    engine.unload_adapter("tuned")
    assert "tuned" not in engine.models()
    with pytest.raises(EngineError, match="no adapter named 'tuned'"):
        engine.unload_adapter("tuned")


def test_noop_adapter_is_flagged(engine, adapters):
    check = engine.load_adapter("noop", adapters["noop"])
    assert not check.changed
    assert str(check.message).startswith("WARNING") and "base model" in str(check.message)
    engine.unload_adapter("noop")


def test_bad_adapter_path_is_a_clear_error(engine, tmp_path):
    with pytest.raises(EngineError, match="not a LoRA adapter folder"):
        engine.load_adapter("ghost", tmp_path)


def test_an_adapter_of_another_base_is_refused_and_the_engine_stays_up(engine, oss_adapter, oss_base):
    with pytest.raises(EngineError) as err:
        engine.load_adapter("stranger", oss_adapter)
    assert str(err.value) == (f"{oss_adapter} was trained on another base ({oss_base}): a GptOssForCausalLM, and "
                              f"{engine.info.model} is a LlamaForCausalLM. Serve it on its own base model")
    assert engine.status().state == "running" and engine.models() == [engine.info.served_name]


def test_the_ui_control_does_what_the_policy_says_and_says_why(engine, adapters):
    """The Serve tab's "Serve this run": serve/policy.py decides (here: into the running engine), the control
    executes it, and the task shows the reason first."""
    from gptoss_webui.ui.engine_ctl import EngineControl

    control = EngineControl(engine.state_path)
    control.serve_adapter(cpu_serve_config("demo:tiny-dense"), "tuned2", str(adapters["tuned"]), "auto")
    wait_for(lambda: not control.busy, 120, "the serve task")
    assert control.snapshot().task.error is None
    assert [str(m) for m in control.snapshot().task.messages] == [
        "vLLM can serve LoRA adapters for this model at run time; loading it into the running engine",
        "adapter 'tuned2' loaded; it changes the model's output"]
    assert engine.status().pid == control.engine.info.pid and "tuned2" in engine.models()
    engine.unload_adapter("tuned2")


def test_restarted_ui_reattaches(engine):
    other = Engine(engine.state_path)  # what a restarted UI does
    info = other.status()
    assert info.state == "running" and info.pid == engine.info.pid and info.port == engine.info.port
    assert engine.info.served_name in other.models()


# --- 3. crash and restart ---------------------------------------------------------------------------

def test_killed_engine_is_detected_and_restarts(cli, engine, oss_base, oss_adapter):
    info = engine.status()
    family = [p.pid for p in psutil.Process(info.pid).children(recursive=True)] + [info.pid]
    # Killed mid-stream: the chat gets one clear line, not a transport traceback. The engine's workers are paused
    # first, so the reply cannot finish before the kill: on 2 cores the first chunk could reach the client after the
    # last token was sent, and the stream then ended cleanly. The API server still accepts the request and starts
    # the streamed response (its access log line), then dies.
    log = Path(info.log_path)
    posts = log.read_text().count("POST /v1/chat/completions")
    workers = psutil.Process(info.pid).children(recursive=True)
    for worker in workers:
        worker.send_signal(signal.SIGSTOP)
    stream = ChatClient.for_engine(engine).stream(QUESTION, info.served_name,
                                                  SamplingParams(temperature=0.0, max_tokens=400))
    failed: list[ChatError] = []
    reader = threading.Thread(target=lambda: failed.extend(read_until_error(stream)))
    reader.start()
    wait_for(lambda: log.read_text().count("POST /v1/chat/completions") > posts, 60, "the chat request to start")
    os.kill(info.pid, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.send_signal(signal.SIGCONT)
    reader.join(60)
    assert [str(e) for e in failed] == [f"{info.served_name}: {CUT_OFF}"]
    wait_for(lambda: engine.status().state == "crashed", 30, "the crash to be noticed")
    crashed = engine.status()
    assert "ended" in crashed.error and "log:" in crashed.error
    wait_for(lambda: not pids_alive(family), 15, "EngineCore/worker processes to end with the engine")
    assert port_free(crashed.host, crashed.port)
    proc, out, _ws = cli
    if info.pid == proc.engine_pid:  # the CLI that started this engine noticed too
        assert proc.wait(30) == 1
        assert "error: the engine crashed" in out.read_text()

    # The same Engine starts again after a crash (on the merged gpt-oss, which section 4 goes on with).
    start_oss(engine, oss_base, oss_adapter)
    restarted = engine.status()
    assert restarted.state == "running" and restarted.error is None and restarted.pid != crashed.pid
    assert engine.models() == ["pirate"]


# --- 4. gpt-oss: merge instead of LoRA on the CPU, harmony chat ---------------------------------------

def test_auto_mode_merges_on_cpu_and_says_why(oss_engine, oss_adapter):
    assert plan.engine_is_cpu()
    info = oss_engine.status()
    assert info.state == "running"
    assert info.adapter_mode == "merge" and not info.lora_enabled
    assert info.merged_from == {"pirate": str(oss_adapter)}
    assert info.served_name == "pirate" and oss_engine.models() == ["pirate"]
    said = " ".join(map(str, oss_engine.progress_messages + info.notes))
    assert "cannot run LoRA on gpt-oss" in said and "Triton" in said
    assert "merged model reproduces the adapter's logits" in said
    assert "--enable-lora" not in info.command
    assert "--reasoning-parser" in info.command and "openai_gptoss" in info.command


def test_merge_matches_hf_peft(oss_engine, oss_base, oss_adapter):
    import torch

    merged_dir = oss_engine.status().model
    result = previous_merge(oss_base, oss_adapter, plan.merged_dir_for(oss_adapter))
    assert result is not None and result.ok and result.out_dir == merged_dir
    assert result.max_abs_diff < 1e-4 and result.adapter_effect > 1e-2
    assert (plan.merged_dir_for(oss_adapter) / PROVENANCE_FILE).is_file()
    # Independent of merge.py's own check: HF+peft against the merged folder, experts included.
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        want = load_hf(oss_base, oss_adapter)(input_ids=ids).logits
        got = load_hf(merged_dir)(input_ids=ids).logits
        base = load_hf(oss_base)(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (got - base).abs().max().item() > 1e-2


def test_merged_engine_streams_harmony_chat_like_hf(oss_engine, oss_base, oss_adapter):
    client = ChatClient.for_engine(oss_engine)
    assert client.harmony
    params = SamplingParams(temperature=0.0, max_tokens=12, reasoning_effort="low")
    snapshots = list(client.stream(QUESTION, "pirate", params, return_token_ids=True))
    final = snapshots[-1]
    assert final.done and not final.cancelled and final.error is None
    assert len(final.token_ids) == 12 and final.token_ids[:3] == HARMONY_LOOP[1:4]
    # The analysis channel is reasoning, apart from the (here empty) final answer, and it streams.
    assert THOUGHT in final.reasoning and final.content == ""
    assert len({s.reasoning for s in snapshots if s.reasoning}) >= 2

    # The harmony path rendered the prompt: header tokens, and the effort we asked for.
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(oss_base).decode(final.prompt_token_ids)
    assert rendered.startswith("<|start|>system<|message|>") and "Reasoning: low" in rendered
    assert rendered.endswith("<|start|>assistant")

    merged = hf_greedy(load_hf(oss_engine.status().model), final.prompt_token_ids, 12)
    peft = hf_greedy(load_hf(oss_base, oss_adapter), final.prompt_token_ids, 12)
    assert final.token_ids == merged[: len(final.token_ids)]
    assert merged == peft


def test_cancel_stops_the_stream(oss_engine):
    client = ChatClient.for_engine(oss_engine)
    params = SamplingParams(temperature=0.0, max_tokens=400)
    cancel = CancelToken()
    got = []
    for reply in client.stream(QUESTION, "pirate", params, cancel=cancel, return_token_ids=True):
        got.append(reply)
        cancel.cancel()  # as the Stop button does, from the UI's thread
    assert got[-1].cancelled and got[-1].done and len(got[-1].token_ids) < 400

    # From another thread, before the first chunk may even have arrived.
    cancel = CancelToken()
    threading.Timer(0.05, cancel.cancel).start()
    final = list(client.stream(QUESTION, "pirate", params, cancel=cancel, return_token_ids=True))[-1]
    assert final.cancelled and final.done and final.error is None and len(final.token_ids) < 400
    # The engine is still fine afterwards.
    assert client.complete(QUESTION, "pirate", SamplingParams(temperature=0.0, max_tokens=4)).done


def test_hotload_on_cpu_gptoss_is_refused_not_fatal(oss_engine, oss_adapter):
    with pytest.raises(EngineError, match="cannot hot-load"):
        oss_engine.load_adapter("again", oss_adapter)
    with pytest.raises(ChatError, match="does not exist|not found|NotFound"):
        ChatClient.for_engine(oss_engine).complete(QUESTION, "no-such-model", SamplingParams(max_tokens=2))
    assert oss_engine.status().state == "running"
