"""The chunked causal-LM loss equals transformers' ForCausalLMLoss in value and gradient."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from gptoss_webui.train import memory
from gptoss_webui.train.loss import causal_lm_loss


def _case(dtype: torch.dtype, vocab: int = 1000, batch: int = 2, seq: int = 37):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, seq, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :10] = -100  # a masked prompt
    labels[1, -5:] = -100  # padding
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 50])
def test_value_and_gradient_match_transformers(dtype, num_items, monkeypatch):
    monkeypatch.setattr(memory, "LOSS_SLICE_BYTES", 4 * 1000 * 7)  # 7 rows a slice: several slices, a ragged last
    logits, labels = _case(dtype)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    ours = causal_lm_loss(ours_in, labels, 1000, num_items_in_batch=num_items)
    ref = ForCausalLMLoss(ref_in, labels, 1000, num_items_in_batch=num_items)
    (ours * 3).backward()
    (ref * 3).backward()
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2 * ref_in.grad.abs().max().item()
    assert ours_in.grad.dtype == dtype
    assert torch.allclose(ours_in.grad.float(), ref_in.grad.float(), atol=tol)
    assert torch.equal(logits, ours_in.detach())  # the logits themselves are not modified


def test_no_gradient_buffer_without_grad():
    logits, labels = _case(torch.float32)
    with torch.no_grad():
        value = causal_lm_loss(logits, labels, 1000)
    assert torch.allclose(value, ForCausalLMLoss(logits, labels, 1000), rtol=1e-5)


def test_prepare_model_installs_it(tmp_path):
    from gptoss_webui.config import TrainConfig
    from gptoss_webui.demo import ensure_demo_model
    from gptoss_webui.train.worker import load_model

    cfg = TrainConfig.model_validate({"precision": "fp32", "lora": {"expert_layers": [1]}})
    model = load_model(str(ensure_demo_model("tiny-gpt-oss")), None, cfg, "eager")
    assert model.get_base_model().loss_function is causal_lm_loss
    ids = torch.randint(0, 1000, (1, 16))
    out = model(input_ids=ids, labels=ids)
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
        model = load_model(path, None, cfg, "eager")
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, model))
    (loss_e, grads_e, _), (loss_c, grads_c, model_c) = results
    layers = model_c.get_base_model().model.layers
    assert layers[0]._compiled_call_impl is not None  # whole layer
    assert layers[1]._compiled_call_impl is None and layers[1].self_attn._compiled_call_impl is not None
    assert torch.allclose(loss_e, loss_c, rtol=1e-5)
    assert grads_e.keys() == grads_c.keys()
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_c[name], rtol=1e-3, atol=1e-6), name
