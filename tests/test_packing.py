"""Packing is exact: a batch of packed blocks gives the loss and LoRA gradients of its examples run one by one.

The batch goes through the training worker's DocumentCollator (positions restart per example; the padding is a
document of its own) into the tiny gpt-oss prepared as the worker prepares it (fused loss, LoRA on attention and
experts). Its sliding window is cut to 16 tokens so that it bites inside the examples, and the learned sinks are
random. On the CPU the packed side runs eager with train/attention.document_masks' dense mask; on a GPU also
flex_attention with its block mask, against the same examples run one by one under eager.
Tolerance: fp32 throughout; 1e-5 relative on the loss, 1e-4 relative (of the largest entry) on each gradient.
"""

from __future__ import annotations

import pytest
import torch

from gptoss_webui.presets import load_recipe
from gptoss_webui.train.data import Example, pack
from gptoss_webui.train.worker import DocumentCollator, prepare_model

SLIDING_WINDOW = 16
LENGTHS = [130, 60, 90, 70, 40]  # packed at 256 tokens: [130, 90] and [70, 60, 40] (+ padding): 2 x 2 flex blocks
ATTENTIONS = ["eager"] + (["flex_attention"] if torch.cuda.is_available() else [])


def _model(path, attention: str, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=torch.float32)
    model.config.sliding_window = SLIDING_WINDOW
    cfg = load_recipe("tiny-cpu-demo", ["train.compile=false"]).train
    model = prepare_model(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A's gradient zero: make every factor count
        for p in model.parameters():  # drawn on the CPU, so that every device gets the same weights
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    return model.to(device)


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
    blocks = pack(examples, 256)
    assert [b.lengths for b in blocks] == [[130, 90], [70, 60, 40]]
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
    assert batch["position_ids"][1, :170].tolist() == list(range(70)) + list(range(60)) + list(range(40))
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
    blocks = pack(examples, 256)
    batch = DocumentCollator(pad_id=0)([{"input_ids": b.input_ids, "labels": b.labels, "lengths": b.lengths}
                                         for b in blocks])
    model = _model(tiny_gpt_oss, "eager", "cpu")
    n_targets = sum(n - 1 for n in LENGTHS)
    right, _ = _loss_and_grads(model, batch, n_targets, "cpu")
    running = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    wrong, _ = _loss_and_grads(model, running, n_targets, "cpu")
    assert abs(right.item() - wrong.item()) > 1e-3


def test_flex_block_mask_is_the_dense_document_mask(tiny_gpt_oss):
    """train/attention.document_masks: its flex_attention BlockMask and its eager mask allow the same pairs, token by
    token through the block mask's mask_mod and block by block in its sparse layout; and those pairs are the
    rule: causal, inside one example, within the window on the sliding layers."""
    from torch.nn.attention.flex_attention import create_mask
    from transformers import AutoConfig

    from gptoss_webui.train.attention import document_masks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.from_pretrained(tiny_gpt_oss)
    config.sliding_window = SLIDING_WINDOW
    blocks = pack(_examples(), 256)
    batch = DocumentCollator(pad_id=0, multiple=128)([{"input_ids": b.input_ids, "labels": b.labels,
                                                       "lengths": b.lengths} for b in blocks])
    positions = batch["position_ids"].to(device)
    eager = document_masks(config, "eager", positions, torch.float32)
    flex = document_masks(config, "flex_attention", positions, torch.float32)
    b, n = positions.shape
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    for kind, window in (("full_attention", n), ("sliding_attention", SLIDING_WINDOW)):
        allowed = eager[kind] == 0  # [b, 1, n, n]: 0 where attention is allowed, the dtype's min elsewhere
        for row in range(b):
            docs = (positions[row].cpu() == 0).cumsum(0)
            rule = (kv <= q) & (docs[q] == docs[kv]) & (q - kv < window)
            assert torch.equal(allowed[row, 0].cpu(), rule), (kind, row)
        block_mask = flex[kind]
        assert torch.equal(create_mask(block_mask.mask_mod, b, 1, n, n, device=device), allowed), kind
        size = block_mask.BLOCK_SIZE[0]
        blocks_allowed = allowed.view(b, 1, n // size, size, n // size, size).any(dim=5).any(dim=3)
        assert torch.equal(block_mask.to_dense().bool(), blocks_allowed), kind
