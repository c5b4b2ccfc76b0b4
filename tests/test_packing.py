"""Packing is exact: a batch of packed blocks gives the loss and LoRA gradients of its examples run one by one.

The batch goes through the training worker's DocumentCollator (positions restart per example; the padding is a
document of its own) into the tiny gpt-oss prepared as the worker prepares it (fused loss, LoRA on attention
and experts). Its sliding window is cut to 16 tokens so that it bites inside the 30-token examples, and the
learned sinks are random. On the CPU the packed side runs eager with transformers' dense document mask; on a GPU
also flex_attention with its block mask, against the same examples run one by one under eager.
Tolerance: fp32 throughout; 1e-5 relative on the loss, 1e-4 relative (of the largest entry) on each gradient.
"""

from __future__ import annotations

import pytest
import torch

from gptoss_webui.presets import load_recipe
from gptoss_webui.train.data import Example, pack
from gptoss_webui.train.worker import DocumentCollator, prepare_model

SLIDING_WINDOW = 16
LENGTHS = [30, 13, 20, 17, 9]  # packed at 64 tokens: [30, 20, 13] and [17, 9] (+ padding)
ATTENTIONS = ["eager"] + (["flex_attention"] if torch.cuda.is_available() else [])


def _model(path, attention: str, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=torch.float32)
    model.config.sliding_window = SLIDING_WINDOW
    cfg = load_recipe("tiny-cpu-demo", ["train.compile=false"]).train
    model = prepare_model(model.to(device), cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A's gradient zero: make every factor count
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def _examples() -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:  # the text format: every token trained, so a boundary would leak into the loss
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        out.append(Example(ids, list(ids)))
    return out


def _loss_and_grads(model, batch: dict[str, torch.Tensor], n_targets: int, device: str):
    model.zero_grad()
    batch = {k: v.to(device) for k, v in batch.items()}
    loss = model(**batch, num_items_in_batch=n_targets).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_packed_blocks_equal_examples_one_by_one(tiny_gpt_oss, attention):
    device = "cuda" if attention == "flex_attention" else "cpu"
    examples = _examples()
    blocks = pack(examples, 64)
    assert [b.lengths for b in blocks] == [[30, 20, 13], [17, 9]]
    n_targets = sum(n - 1 for n in LENGTHS)  # each example's first token has nothing before it to predict from

    reference = _model(tiny_gpt_oss, "eager", "cpu")
    separate_loss, separate_grads = torch.zeros(()), None
    for ex in examples:  # one at a time; the gradients add up as they would over one batch
        batch = DocumentCollator(pad_id=0)([{"input_ids": ex.input_ids, "labels": ex.labels}])
        loss, grads = _loss_and_grads(reference, batch, n_targets, "cpu")
        separate_loss += loss
        separate_grads = grads if separate_grads is None else {n: separate_grads[n] + g for n, g in grads.items()}

    collate = DocumentCollator(pad_id=0, multiple=128 if attention == "flex_attention" else 1)
    batch = collate([{"input_ids": b.input_ids, "labels": b.labels, "lengths": b.lengths} for b in blocks])
    assert batch["position_ids"][1, :26].tolist() == list(range(17)) + list(range(9))
    packed = _model(tiny_gpt_oss, attention, device)
    packed_loss, packed_grads = _loss_and_grads(packed, batch, n_targets, device)

    torch.testing.assert_close(packed_loss.cpu(), separate_loss, rtol=1e-5, atol=0)
    assert separate_grads.keys() == packed_grads.keys() and any("experts" in n for n in packed_grads)
    for name, expected in separate_grads.items():
        scale = expected.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(packed_grads[name].cpu(), expected, rtol=0, atol=1e-4 * scale, msg=name)


def test_a_leak_across_examples_would_be_caught(tiny_gpt_oss):
    """The same packed batch with positions running on (the old packing) gives a different loss."""
    examples = _examples()
    blocks = pack(examples, 64)
    batch = DocumentCollator(pad_id=0)([{"input_ids": b.input_ids, "labels": b.labels, "lengths": b.lengths}
                                         for b in blocks])
    model = _model(tiny_gpt_oss, "eager", "cpu")
    n_targets = sum(n - 1 for n in LENGTHS)
    right, _ = _loss_and_grads(model, batch, n_targets, "cpu")
    running = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    wrong, _ = _loss_and_grads(model, running, n_targets, "cpu")
    assert abs(right.item() - wrong.item()) > 1e-3
