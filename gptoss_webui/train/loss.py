"""The causal-LM loss over gpt-oss's 201k vocabulary, computed from the hidden states: the logits never exist whole.

transformers computes logits = lm_head(hidden) for every token ([tokens, 201,088], 1.5 GiB in bf16 at 4096
tokens), then its loss upcasts them to fp32 and autograd keeps three more such tensors: 11 GiB at 4096 tokens,
the peak of a checkpointed step. Here, a slice of rows at a time, the slice's logits are computed, turned into
the loss and the gradient of the hidden states (softmax - onehot, times lm_head's weight), and dropped: only
[tokens, hidden] survives. lm_head is frozen (LoRA never targets it), so its weight needs no gradient.
`install_fused_loss` makes the model's forward use it whenever labels are given; without labels (generation,
tests reading logits) the model's own forward runs. Same value and gradient as ForCausalLMLoss. This training
forward also gives gpt-oss the document masks of a packed batch (train/attention.document_masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptoss_webui.train.memory import loss_slice_rows

IGNORE_INDEX = -100


class _LmHeadCrossEntropySum(torch.autograd.Function):
    """sum over rows of -log softmax(hidden @ weight.T)[target]; ignored rows add nothing."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = loss_slice_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            h = hidden[start:start + step]
            x = (h @ weight.t()).float()  # this slice's logits, in fp32
            y = targets[start:start + step]
            valid = y != ignore_index
            y = torch.where(valid, y, 0)[:, None]
            lse = torch.logsumexp(x, dim=-1, keepdim=True)
            total += ((lse - x.gather(1, y)).squeeze(1) * valid).sum()
            if want_grad:  # d/dlogits = softmax(x) - onehot(y), zero on ignored rows; d/dhidden = that @ weight
                x.sub_(lse).exp_()
                x.scatter_add_(1, y, torch.full_like(y, -1, dtype=x.dtype))
                x.mul_(valid[:, None])
                grad[start:start + step] = x.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # In place: the graph is not kept (no retain_graph in training), so the buffer is used once.
        return grad.mul_(grad_total.to(grad.dtype)), None, None, None


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 num_items_in_batch: torch.Tensor | int | None = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """ForCausalLMLoss(hidden @ weight.T, labels) with the same shift and reduction, without the logits."""
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    total = _LmHeadCrossEntropySum.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, ignore_index)
    if num_items_in_batch is None:  # a mean over the counted tokens, as cross_entropy's "mean"
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def install_fused_loss(model) -> None:
    """Route a causal LM's forward with labels through lm_head_loss (the returned logits are None then)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    own_forward = model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, labels=None, num_items_in_batch=None,
                **kwargs):
        if labels is None or kwargs.get("output_router_logits") or model.config.output_router_logits:
            return own_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs.pop("use_cache", None)
        if attention_mask is None and position_ids is not None and model.config.model_type == "gpt_oss":
            # A packed batch (train/worker.DocumentCollator): examples are kept apart by their position ids.
            from gptoss_webui.train.attention import document_masks

            attention_mask = document_masks(model.config, model.config._attn_implementation, position_ids,
                                            model.lm_head.weight.dtype)
        outputs = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, **kwargs)
        loss = lm_head_loss(outputs.last_hidden_state, model.lm_head.weight, labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = forward
