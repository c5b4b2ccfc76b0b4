"""The loss from the hidden states (train/loss.py) equals transformers' ForCausalLMLoss on hidden @ W.T."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from gptoss_webui.train import memory
from gptoss_webui.train.loss import lm_head_loss


def _case(dtype: torch.dtype, vocab: int = 1000, hidden: int = 24, batch: int = 2, seq: int = 37):
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(batch, seq, hidden, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :10] = -100  # a masked prompt
    labels[1, -5:] = -100  # padding
    return states, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 50])
def test_value_and_gradient_match_transformers(dtype, num_items, monkeypatch):
    monkeypatch.setattr(memory, "LOSS_SLICE_BYTES", 4 * 1000 * 7)  # 7 rows a slice: several slices, a ragged last
    states, weight, labels = _case(dtype)
    ours_in = states.clone().requires_grad_()
    ref_in = states.clone().requires_grad_()
    ours = lm_head_loss(ours_in, weight, labels, num_items_in_batch=num_items)
    ref = ForCausalLMLoss(ref_in @ weight.t(), labels, 1000, num_items_in_batch=num_items)
    (ours * 3).backward()
    (ref * 3).backward()
    assert ours.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(ours, ref.float(), rtol=tol, atol=tol)
    grad_tol = 1e-6 if dtype == torch.float32 else 2e-2 * ref_in.grad.abs().max().item()
    assert ours_in.grad.dtype == dtype
    assert torch.allclose(ours_in.grad.float(), ref_in.grad.float(), atol=grad_tol)
    assert torch.equal(states, ours_in.detach())  # the hidden states themselves are not modified


def test_no_gradient_buffer_without_grad():
    states, weight, labels = _case(torch.float32)
    with torch.no_grad():
        value = lm_head_loss(states, weight, labels)
    assert torch.allclose(value, ForCausalLMLoss(states @ weight.t(), labels, 1000), rtol=1e-5)


def test_prepare_model_installs_it(tmp_path):
    """With labels the model returns our loss and no logits; without, its own logits (CPU input embeddings)."""
    from gptoss_webui.config import TrainConfig
    from gptoss_webui.demo import ensure_demo_model
    from gptoss_webui.train.weights import CpuEmbedding
    from gptoss_webui.train.worker import load_model

    cfg = TrainConfig.model_validate({"precision": "fp32", "lora": {"expert_layers": [1]}})
    model, _, _ = load_model(str(ensure_demo_model("tiny-gpt-oss")), None, cfg, "eager")
    assert isinstance(model.get_input_embeddings(), CpuEmbedding)
    ids = torch.randint(0, 1000, (1, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.allclose(out.loss, ForCausalLMLoss(logits, ids, logits.shape[-1]), rtol=1e-5)


def test_compiled_layers_train_like_eager():
    """train.compile: same loss and LoRA gradients as eager, with checkpointing and expert LoRA on layer 1."""
    from gptoss_webui.config import TrainConfig
    from gptoss_webui.demo import ensure_demo_model
    from gptoss_webui.train.worker import load_model

    path = str(ensure_demo_model("tiny-gpt-oss"))
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)  # same LoRA init in both models
        cfg = TrainConfig.model_validate({"precision": "fp32", "compile": compiled,
                                          "lora": {"expert_layers": [1]}})
        model, _, _ = load_model(path, None, cfg, "eager")
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, model))
    (loss_e, grads_e, _), (loss_c, grads_c, model_c) = results
    layers = model_c.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)  # whole layers, expert LoRA included
    assert any(".mlp.experts.lora_A" in name for name in grads_c)
    assert torch.allclose(loss_e, loss_c, rtol=1e-5)
    assert grads_e.keys() == grads_c.keys()
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_c[name], rtol=1e-3, atol=1e-6), name
