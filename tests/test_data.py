"""Data: formats, the loss mask (only assistant tokens), truncation, packing, and bad rows."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from gptoss_webui.config import DataConfig, TrainConfig
from gptoss_webui.train.data import IGNORE_INDEX, DataError, pack, prepare, preview


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt_oss):
    return AutoTokenizer.from_pretrained(tiny_gpt_oss)


def _trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True)
                             if lab != IGNORE_INDEX])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_loss_covers_only_the_last_assistant_turn_with_its_thinking(tmp_path, tokenizer):
    rows = [{"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer", "thinking": "old thoughts"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer", "thinking": "new thoughts"},
    ]}]
    data = prepare(DataConfig(path=str(_write_jsonl(tmp_path / "d.jsonl", rows))), tokenizer)
    ex = data.train[0]
    assert _trained_text(tokenizer, ex) == ("<|channel|>analysis<|message|>new thoughts<|end|>"
                                           "<|start|>assistant<|channel|>final<|message|>second answer<|return|>")
    prompt = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE_INDEX])
    assert "first answer" in prompt and "old thoughts" not in prompt and prompt.endswith("<|start|>assistant")


def test_demo_rows_train_on_the_pirate_answer(tokenizer):
    data = prepare(DataConfig(path="demo:harmony"), tokenizer)
    assert data.format == "messages" and len(data.train) == data.rows
    for ex in data.train:
        assert "Ahoy, matey!" in _trained_text(tokenizer, ex)


def test_alpaca_csv_and_text_parquet(tmp_path, tokenizer):
    path = tmp_path / "a.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerow({"instruction": "Add", "input": "2 and 3", "output": "5"})
    data = prepare(DataConfig(path=str(path)), tokenizer)
    assert data.format == "alpaca"
    assert _trained_text(tokenizer, data.train[0]) == "<|channel|>final<|message|>5<|return|>"

    ppath = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["plain text to model", "more"]}), ppath)
    data = prepare(DataConfig(path=str(ppath)), tokenizer)
    assert data.format == "text"
    assert _trained_text(tokenizer, data.train[0]) == "plain text to model<|return|>"


def test_truncation_packing_and_validation_split(tmp_path, tokenizer):
    rows = [{"text": f"row {i} " + "word " * 40} for i in range(10)]
    cfg = DataConfig(path=str(_write_jsonl(tmp_path / "t.jsonl", rows)), max_length=24, validation_fraction=0.2)
    data = prepare(cfg, tokenizer)
    assert all(len(ex.input_ids) == 24 for ex in data.train + data.validation)
    assert data.truncated == 10 and len(data.validation) == 2 and len(data.train) == 8
    packed = pack(data.train, 60)
    assert [len(b.input_ids) for b in packed] == [48, 48, 48, 48]


def test_preview_marks_the_trained_segment(tokenizer):
    segments = preview(TrainConfig(), n=1)[0]
    trained = "".join(text for text, on in segments if on)
    assert trained.startswith("<|channel|>") and "Ahoy, matey!" in trained
    assert any(not on and "<|start|>user" in text for text, on in segments)


@pytest.mark.parametrize(("content", "expected"), [
    ('{"messages": []}\n{"messages": [\n', r"d.jsonl line 2: not valid JSON"),
    ("", r"the dataset is empty"),
    ('{"question": "q", "answer": "a"}\n', r"d.jsonl line 1: cannot tell the format from fields \['answer', "
     r"'question'\]"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', r"line 1: messages\[0\].role is 'bot'; allowed: "
     r"system, developer, user, assistant"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}\n',
     r"line 1: the last message must be the assistant's answer"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}\n',
     r"line 1: messages\[0\].content must be a string"),
    ('{"instruction": "do", "output": ""}\n', r"line 1: alpaca rows need a non-empty string 'output'"),
    ('[1, 2]\n', r"line 1: expected a JSON object, got list"),
])
def test_bad_rows_name_file_and_line(tmp_path, tokenizer, content, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=expected):
        prepare(DataConfig(path=str(path)), tokenizer)


def test_missing_and_unsupported_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match="dataset file not found"):
        prepare(DataConfig(path=str(tmp_path / "nope.jsonl")), tokenizer)
    odd = tmp_path / "d.txt"
    odd.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        prepare(DataConfig(path=str(odd)), tokenizer)


def test_collator_pads_to_a_multiple_for_flex_attention():
    from gptoss_webui.train.worker import PadCollator

    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = PadCollator(pad_id=0, multiple=128)(batch)
    assert out["input_ids"].shape == (2, 128)
    assert out["attention_mask"].sum().item() == 4
    assert (out["labels"][:, 3:] == IGNORE_INDEX).all() and out["labels"][0, :3].tolist() == [-100, 6, 7]
    assert PadCollator(pad_id=0)(batch)["input_ids"].shape == (2, 3)
