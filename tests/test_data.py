"""Data: formats, the loss mask (only assistant tokens), truncation, packing, and bad rows."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from gptoss_webui.config import DataConfig, TrainConfig
from gptoss_webui.train.data import IGNORE_INDEX, DataError, Example, pack, padding_fraction, prepare, preview


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
    data = prepare(DataConfig(path="demo:harmony", packing=False), tokenizer)
    assert data.format == "messages" and len(data.train) == data.stats.rows
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
    data = prepare(DataConfig(path=str(ppath), packing=False), tokenizer)
    assert data.format == "text"
    assert _trained_text(tokenizer, data.train[0]) == "plain text to model<|return|>"


def test_truncation_packing_and_validation_split(tmp_path, tokenizer):
    rows = [{"text": f"row {i} " + "word " * 40} for i in range(10)]
    cfg = DataConfig(path=str(_write_jsonl(tmp_path / "t.jsonl", rows)), max_length=24, validation_fraction=0.2)
    data = prepare(cfg, tokenizer)
    assert all(len(ex.input_ids) == 24 for ex in data.train + data.validation)
    assert data.stats.truncated == 10 and len(data.validation) == 2 and len(data.train) == 8
    packed = pack(data.train, 60)
    assert [b.lengths for b in packed] == [[24, 24]] * 4


def test_packing_fills_blocks_best_fit_and_counts_padding(tmp_path, tokenizer):
    lengths = [9, 2, 7, 3, 5, 4, 1, 8]
    blocks = pack([Example(list(range(n)), list(range(n))) for n in lengths], 10)
    assert [b.lengths for b in blocks] == [[9, 1], [8, 2], [7, 3], [5, 4]]
    assert all(len(b.input_ids) == sum(b.lengths) for b in blocks)
    assert padding_fraction(blocks, batch_size=2) == 1 - 39 / 40
    assert padding_fraction([Example([0] * n, [0] * n) for n in (4, 2, 3, 3)], batch_size=2) == 1 - 12 / 14

    rows = [{"text": "word " * n} for n in (3, 40, 5, 60, 7, 2, 30, 12, 25, 8, 50, 4, 90, 200)]
    cfg = DataConfig(path=str(_write_jsonl(tmp_path / "t.jsonl", rows)), max_length=128)
    stats = prepare(cfg, tokenizer, batch_size=2).stats
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped) == (14, 14, 1, 0)
    assert stats.blocks == 4 and stats.padding < 0.05 < 0.3 < stats.padding_unpacked
    assert "14 training examples from 14 rows (1 truncated at max_length, 0 dropped" in str(stats.summary())
    unpacked = prepare(cfg.model_copy(update={"packing": False}), tokenizer, batch_size=2).stats
    assert unpacked.blocks == 14 and unpacked.padding == unpacked.padding_unpacked == stats.padding_unpacked


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


def test_wrong_fields_for_a_forced_format_list_what_the_row_has(tmp_path, tokenizer):
    path = tmp_path / "a.csv"
    path.write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a.csv line 2: alpaca rows need the fields 'instruction' and 'output' "
                                        r"\('input' is optional\); this row has \['answer', 'question'\]"):
        prepare(DataConfig(path=str(path), format="alpaca"), tokenizer)
    alpaca = _write_jsonl(tmp_path / "al.jsonl", [{"instruction": "Add", "output": "5"}])
    with pytest.raises(DataError, match=r"line 1: 'messages' rows need a 'messages' list; this row has "
                                        r"\['instruction', 'output'\] \(data.format: auto detects"):
        prepare(DataConfig(path=str(alpaca), format="messages"), tokenizer)
    assert prepare(DataConfig(path=str(alpaca)), tokenizer).format == "alpaca"  # what the presets now say: auto


def test_a_dataset_of_empty_answers_is_refused(tmp_path, tokenizer):
    empty = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}
    with pytest.raises(DataError, match=r"every assistant answer is empty \(e.g. e.jsonl line 1\)"):
        prepare(DataConfig(path=str(_write_jsonl(tmp_path / "e.jsonl", [empty, empty]))), tokenizer)
    full = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert prepare(DataConfig(path=str(_write_jsonl(tmp_path / "m.jsonl", [empty, full]))), tokenizer)


def test_missing_and_unsupported_files(tmp_path, tokenizer):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "train.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"set is a folder; give one data file \(data files in it: train.jsonl\)"):
        prepare(DataConfig(path=str(tmp_path / "set")), tokenizer)
    with pytest.raises(DataError, match=r"is a folder; give one data file \(it holds no .jsonl/.json/"):
        prepare(DataConfig(path=str(tmp_path)), tokenizer)
    with pytest.raises(DataError, match="dataset file not found"):
        prepare(DataConfig(path=str(tmp_path / "nope.jsonl")), tokenizer)
    odd = tmp_path / "d.txt"
    odd.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        prepare(DataConfig(path=str(odd)), tokenizer)


def test_collator_restarts_positions_and_pads_to_a_multiple_for_flex_attention():
    from gptoss_webui.train.worker import DocumentCollator

    batch = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "lengths": [3, 2]},
             {"input_ids": [8], "labels": [8]}]
    out = DocumentCollator(pad_id=0, multiple=128)(batch)
    assert out["input_ids"].shape == (2, 128) and "attention_mask" not in out
    assert out["position_ids"][0, :7].tolist() == [0, 1, 2, 0, 1, 0, 1]  # two examples, then the padding
    assert out["position_ids"][1, :3].tolist() == [0, 0, 1]
    # Each example's first label goes: the shift would have the previous example predict it.
    assert out["labels"][0, :5].tolist() == [-100, 6, 7, -100, 9] and out["labels"][1, 0] == IGNORE_INDEX
    assert (out["labels"][:, 5:] == IGNORE_INDEX).all()
    assert DocumentCollator(pad_id=0)(batch)["input_ids"].shape == (2, 5)


def test_a_bad_row_reads_in_chinese_with_its_line(tmp_path, tokenizer):
    from gptoss_webui.messages import text

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"messages": [{"role": "bot", "content": "x"}]}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare(DataConfig(path=str(path), format="messages"), tokenizer)
    assert str(info.value) == "d.jsonl line 1: 'messages' rows need a 'messages' list; this row has ['text'] " \
        "(data.format: auto detects alpaca and text rows)"
    assert text(info.value, "zh") == ("d.jsonl 第 1 行：'messages' 格式的行需要一个 'messages' 列表；这一行的字段是 "
                                      "['text']（data.format: auto 会自动识别 alpaca 和 text 格式的行）")
    path.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare(DataConfig(path=str(path)), tokenizer)
    assert text(info.value, "zh") == ("d.jsonl 第 1 行：messages[0].role 是 'bot'；允许的值：system, developer, user, "
                                      "assistant")
