"""Training data: read rows, check them, render them with the tokenizer's chat template, mask the loss.

Formats (auto-detected from the first row, or set with data.format):
  messages  {"messages": [{"role": system|developer|user|assistant, "content": str, "thinking"?: str}]}
            The loss covers the last assistant turn only (its analysis channel from `thinking`, and its
            final answer): earlier turns are context, as the harmony template drops their reasoning.
  alpaca    {"instruction": str, "input"?: str, "output": str}  -> a user turn and an assistant turn
  text      {"text": str}  -> plain language modelling, every token trained

Bad data fails here, before any model loads, naming the file and line (or row).
"""

from __future__ import annotations

import bisect
import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_webui.config import ConfigError, DataConfig
from gptoss_webui.messages import Message, say
from gptoss_webui.sources import resolve_dataset

IGNORE_INDEX = -100  # label value the loss skips
ROLES = ("system", "developer", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ConfigError):
    """A dataset problem worded for the user, naming the file and line/row."""


@dataclass
class Row:
    source: Message  # "file.jsonl line 12" / "dataset row 3": where to look when it is wrong
    data: dict[str, Any]


@dataclass
class Example:
    """Token ids and labels of one example, or of a packed block of examples (`lengths`: each one's tokens)."""

    input_ids: list[int]
    labels: list[int]
    lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.lengths:
            self.lengths = [len(self.input_ids)]


# --- reading ------------------------------------------------------------------------------------

def read_rows(cfg: DataConfig) -> list[Row]:
    spec = resolve_dataset(cfg.path)
    path = Path(spec)
    is_local = path.suffix.lower() in LOCAL_SUFFIXES or path.exists()
    rows = _read_local(path) if is_local else _read_hub(spec, cfg.split)
    if cfg.max_samples:
        rows = rows[: cfg.max_samples]
    if not rows:
        raise DataError(say("data.empty", path=spec))
    return rows


def _read_local(path: Path) -> list[Row]:
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in LOCAL_SUFFIXES)
        inside = (say("data.folder_files", files=", ".join(found[:10])) if found else
                  say("data.folder_empty", suffixes="/".join(LOCAL_SUFFIXES)))
        raise DataError(say("data.folder", path=path, inside=inside))
    if not path.is_file():
        raise DataError(say("data.not_found", path=path))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(say("data.bad_json_line", path=path, line=n, error=exc.msg,
                                             column=exc.colno)) from None
                if not isinstance(obj, dict):
                    raise DataError(say("data.line_not_object", path=path, line=n, type=type(obj).__name__))
                rows.append(Row(say("data.source.line", file=path.name, line=n), obj))
        return rows
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(say("data.bad_json", path=path, line=exc.lineno, error=exc.msg)) from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataError(say("data.not_list", path=path))
        return [_row(say("data.source.row", file=path.name, row=i), r) for i, r in enumerate(obj, 1)]
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            # Row 1 is the header, so data row i sits on line i + 1.
            return [Row(say("data.source.line", file=path.name, line=i + 1), dict(r))
                    for i, r in enumerate(csv.DictReader(fh), 1)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(say("data.bad_parquet", path=path, error=exc)) from None
        return [_row(say("data.source.row", file=path.name, row=i), r) for i, r in enumerate(table.to_pylist(), 1)]
    raise DataError(say("data.bad_suffix", path=path, suffix=suffix, suffixes=", ".join(LOCAL_SUFFIXES)))


def _row(source: Message, obj: Any) -> Row:
    if not isinstance(obj, dict):
        raise DataError(say("data.row_not_object", source=source, type=type(obj).__name__))
    return Row(source, obj)


def _read_hub(name: str, split: str) -> list[Row]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, unknown split: all say the same to the user
        raise DataError(say("data.hub", name=name, split=split, error=str(exc).splitlines()[0][:300])) from None
    return [Row(say("data.source.row", file=name, row=i), dict(r)) for i, r in enumerate(ds, 1)]


# --- checking and converting to conversations -----------------------------------------------------

def detect_format(row: Row) -> str:
    keys = set(row.data)
    if "messages" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise DataError(say("data.unknown_format", source=row.source, fields=sorted(keys)))


def to_messages(row: Row, fmt: str) -> list[dict[str, str]] | str:
    """A checked conversation (list of messages) or, for the text format, the text itself."""
    d = row.data
    if fmt == "text":
        text = d.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(say("data.text_empty", source=row.source))
        return text
    if fmt == "alpaca":
        if not {"instruction", "output"} <= set(d):
            raise DataError(say("data.alpaca_fields", source=row.source, fields=sorted(d)))
        for key in ("instruction", "output"):
            if not isinstance(d.get(key), str) or not d[key].strip():
                raise DataError(say("data.alpaca_empty", source=row.source, field=key))
        prompt = d["instruction"] if not d.get("input") else f"{d['instruction']}\n\n{d['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": d["output"]}]
    messages = d.get("messages")
    if "messages" not in d:
        raise DataError(say("data.messages_missing", source=row.source, fields=sorted(d)))
    if not isinstance(messages, list) or not messages:
        raise DataError(say("data.messages_empty", source=row.source))
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(say("data.message_not_object", source=row.source, index=i))
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(say("data.bad_role", source=row.source, index=i, role=repr(role), roles=", ".join(ROLES)))
        if not isinstance(content, str):
            raise DataError(say("data.content_not_string", source=row.source, index=i))
        msg = {"role": role, "content": content}
        if m.get("thinking"):
            if role != "assistant" or not isinstance(m["thinking"], str):
                raise DataError(say("data.bad_thinking", source=row.source, index=i))
            msg["thinking"] = m["thinking"]
        out.append(msg)
    if out[-1]["role"] != "assistant":
        raise DataError(say("data.last_not_assistant", source=row.source, role=out[-1]["role"]))
    return out


# --- tokenizing and masking ------------------------------------------------------------------------

def _ids(encoded: Any) -> list[int]:
    # apply_chat_template returns a list, or a BatchEncoding when return_dict defaults to True.
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


def tokenize(tokenizer: Any, sample: list[dict[str, str]] | str, max_length: int, source: Message | str) -> Example:
    if isinstance(sample, str):
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        return Example(ids, list(ids))
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(say("data.no_chat_template"))
    full = _ids(tokenizer.apply_chat_template(sample, tokenize=True))
    prompt = _ids(tokenizer.apply_chat_template(sample[:-1], tokenize=True, add_generation_prompt=True))
    if full[: len(prompt)] != prompt:
        raise DataError(say("data.template_mismatch", source=source))
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt):]
    full, labels = full[:max_length], labels[:max_length]
    return Example(full, labels)


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Best-fit-decreasing: put each example, longest first, into the fullest block it still fits (an example
    is never split), so blocks come out nearly full. Each block keeps its examples' lengths: the collator
    restarts positions at every example and the attention mask keeps examples apart."""
    members: list[list[Example]] = []
    room: list[tuple[int, int]] = []  # (tokens left, block index), sorted
    for ex in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(ex.input_ids)
        i = bisect.bisect_left(room, (n, -1))
        if i < len(room):
            left, b = room.pop(i)
        else:
            left, b = max_length, len(members)
            members.append([])
        members[b].append(ex)
        bisect.insort(room, (left - n, b))
    return [Example([t for e in block for t in e.input_ids], [t for e in block for t in e.labels],
                    [len(e.input_ids) for e in block]) for block in members]


def padding_fraction(examples: list[Example], batch_size: int) -> float:
    """Share of the batches' tokens that are padding when `batch_size` consecutive items are padded to the
    longest of them."""
    lengths = [len(e.input_ids) for e in examples]
    padded = sum(len(chunk) * max(chunk)
                 for chunk in (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)))
    return 1 - sum(lengths) / padded if padded else 0.0


@dataclass
class DataStats:
    """What preparing the data did, for the start event (the CLI and the Train tab show it)."""

    rows: int
    truncated: int  # examples cut at max_length
    dropped: int  # examples left with no trained token after the cut
    examples: int  # training examples
    blocks: int  # training items after packing (= examples without packing)
    padding: float  # share of padding tokens in the batches as trained
    padding_unpacked: float  # the same, one example per item

    def summary(self) -> Message:
        counts = say("data.counts", examples=self.examples, rows=self.rows)
        if self.truncated or self.dropped:
            counts = say("data.cut", counts=counts, truncated=self.truncated, dropped=self.dropped)
        if self.blocks != self.examples:
            counts = say("data.packed", counts=counts, blocks=self.blocks)
        return say("data.summary", counts=counts, padding=self.padding, unpacked=self.padding_unpacked)


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    format: str
    stats: DataStats


def prepare(cfg: DataConfig, tokenizer: Any, seed: int = 42, batch_size: int = 1) -> PreparedData:
    rows = read_rows(cfg)
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows[0])
    samples = [(r.source, to_messages(r, fmt)) for r in rows]  # checks every row before tokenizing any
    if fmt == "messages" and all(not s[-1]["content"].strip() and not s[-1].get("thinking") for _, s in samples):
        raise DataError(say("data.empty_answers", path=cfg.path, example=samples[0][0]))
    examples, truncated = [], 0
    for source, sample in samples:
        ex = tokenize(tokenizer, sample, cfg.max_length, source)
        truncated += len(ex.input_ids) == cfg.max_length
        if any(label != IGNORE_INDEX for label in ex.labels):
            examples.append(ex)
    if not examples:
        raise DataError(say("data.nothing_trainable", path=cfg.path, max_length=cfg.max_length))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(len(examples) * cfg.validation_fraction)
    if cfg.validation_fraction > 0 and n_val == 0:
        n_val = 1
    val = [examples[i] for i in order[:n_val]]
    unpacked = train = [examples[i] for i in sorted(order[n_val:])]
    if cfg.packing:
        train, val = pack(train, cfg.max_length), pack(val, cfg.max_length)

    def padding(items: list[Example]) -> float:  # in a random order, as the sampler draws them
        return padding_fraction(random.Random(seed).sample(items, len(items)), batch_size)

    stats = DataStats(rows=len(rows), truncated=truncated, dropped=len(rows) - len(examples),
                      examples=len(unpacked), blocks=len(train), padding=padding(train),
                      padding_unpacked=padding(unpacked))
    return PreparedData(train, val, fmt, stats)


def preview(train_cfg: Any, n: int = 1) -> list[list[tuple[str, bool]]]:
    """The first n examples as text segments, True where tokens are trained (for the UI's highlight)."""
    from transformers import AutoTokenizer

    from gptoss_webui.sources import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(train_cfg.model))
    rows = read_rows(train_cfg.data.model_copy(update={"max_samples": n}))
    fmt = train_cfg.data.format if train_cfg.data.format != "auto" else detect_format(rows[0])
    out = []
    for row in rows[:n]:
        ex = tokenize(tokenizer, to_messages(row, fmt), train_cfg.data.max_length, row.source)
        segments: list[tuple[str, bool]] = []
        start = 0
        for i in range(1, len(ex.input_ids) + 1):
            if i == len(ex.input_ids) or (ex.labels[i] != IGNORE_INDEX) != (ex.labels[start] != IGNORE_INDEX):
                segments.append((tokenizer.decode(ex.input_ids[start:i]), ex.labels[start] != IGNORE_INDEX))
                start = i
        out.append(segments)
    return out
