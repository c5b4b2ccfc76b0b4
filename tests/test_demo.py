"""The embedded demo: the tiny models load with transformers, and the tokenizer is o200k_harmony."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai_harmony as oh
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptoss_webui import demo
from gptoss_webui import tokenizer as tokenizer_module
from gptoss_webui.sources import resolve_dataset

SAMPLES = [
    "Hello, world!",
    "<|start|>user<|message|>What's 2+2?<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
    "中文测试，你好！  \n\n  tabs\tand 123456 numbers",
    "I'm sure they'll say DON'T. emoji 🤖🎉 ünïcödé",
    "<|channel|>analysis<|message|>think<|end|><|constrain|><|call|><|reserved_200013|>",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt_oss):
    return AutoTokenizer.from_pretrained(tiny_gpt_oss)


@pytest.fixture(scope="module")
def harmony():
    return tokenizer_module.load_harmony_encoding()


def test_demo_command_prints_where_everything_is():
    out = subprocess.run([sys.executable, "-m", "gptoss_webui", "demo"], capture_output=True, text=True,
                         check=True).stdout
    for key in ("tiny-gpt-oss", "tiny-dense", "tokenizer", "dataset"):
        assert key in out
    assert "demo_harmony.jsonl" in out


def test_tiny_models_load_with_transformers(tiny_gpt_oss, tiny_dense):
    for path, arch in ((tiny_gpt_oss, "GptOssForCausalLM"), (tiny_dense, "LlamaForCausalLM")):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert type(model).__name__ == arch
        assert model.config.vocab_size == tokenizer_module.VOCAB_SIZE
        assert model.config.head_dim >= 32  # vLLM's CPU attention
        logits = model(torch.tensor([[1, 2, 3]])).logits
        assert logits.shape == (1, 3, tokenizer_module.VOCAB_SIZE) and torch.isfinite(logits).all()


def test_the_build_is_deterministic_and_repaired_when_corrupt(tiny_gpt_oss, tmp_path):
    weights = tiny_gpt_oss / "model.safetensors"
    before = weights.read_bytes()
    weights.write_bytes(before[:1000])  # corrupt it
    rebuilt = demo.ensure_demo_model("tiny-gpt-oss")
    assert rebuilt == tiny_gpt_oss
    assert weights.read_bytes() == before  # same seed, same bytes


def test_tokenizer_round_trips_like_the_harmony_encoder(tokenizer, harmony):
    assert len(tokenizer) == tokenizer_module.VOCAB_SIZE
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (200002, 199999)
    for text in SAMPLES:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == harmony.encode(text, allowed_special="all"), text
        assert tokenizer.decode(ids) == text


def _harmony_conversation(messages: list[dict], effort: oh.ReasoningEffort) -> oh.Conversation:
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(effort))]
    for i, m in enumerate(messages):
        if m["role"] in ("system", "developer"):
            content = oh.DeveloperContent.new().with_instructions(m["content"])
            out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, content))
        elif m["role"] == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, m["content"]))
        else:
            if m.get("thinking") and i == len(messages) - 1:
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["thinking"]).with_channel("analysis"))
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["content"]).with_channel("final"))
    return oh.Conversation.from_messages(out)


def test_chat_template_renders_exactly_like_harmony(tokenizer, harmony):
    rows = [json.loads(line) for line in Path(resolve_dataset("demo:harmony")).read_text("utf-8").splitlines()]
    rows.append({"messages": [
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0", "thinking": "dropped"},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "thinking": "kept"}]})
    keep_last_analysis = oh.RenderConversationConfig(auto_drop_analysis=False)
    for row in rows:
        msgs = row["messages"]
        for effort in (oh.ReasoningEffort.LOW, oh.ReasoningEffort.HIGH):
            name = effort.value.lower()
            training = harmony.render_conversation_for_training(_harmony_conversation(msgs, effort),
                                                                keep_last_analysis)
            assert list(tokenizer.apply_chat_template(msgs, reasoning_effort=name, return_dict=False)) == training
            prompt = harmony.render_conversation_for_completion(_harmony_conversation(msgs[:-1], effort),
                                                                oh.Role.ASSISTANT)
            assert list(tokenizer.apply_chat_template(msgs[:-1], reasoning_effort=name, return_dict=False,
                                                      add_generation_prompt=True)) == prompt


def test_demo_dataset_is_harmony_messages_with_some_thinking():
    rows = [json.loads(line) for line in Path(resolve_dataset("demo:harmony")).read_text("utf-8").splitlines()]
    assert len(rows) >= 20
    assert any("thinking" in m for r in rows for m in r["messages"])
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)


def test_the_built_files_are_readable_by_every_user_of_the_workspace(tiny_gpt_oss):
    modes = {f.name: f.stat().st_mode & 0o777 for f in tiny_gpt_oss.iterdir() if f.is_file()}
    assert all(mode & 0o044 == 0o044 for mode in modes.values()), modes  # safetensors alone writes 0600
