"""The causal-LM loss over gpt-oss's 201k vocabulary without its fp32 copies.

transformers' ForCausalLMLoss upcasts the whole [tokens, vocab] logits to fp32 and autograd keeps
log_softmax's output, its gradient and the logits' gradient: about 14 bytes per logit, 11 GiB at 4096
tokens, the peak of a checkpointed step. Here the loss and its gradient are computed together, a
slice of rows at a time in fp32, and only the gradient is kept, in the logits' own dtype (4 bytes per
logit in bf16, logits included). Same value and gradient as ForCausalLMLoss; worker.prepare_model
installs it as the model's `loss_function`, so Trainer, DeepSpeed and gradient accumulation see no change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptoss_webui.train.memory import loss_slice_rows

IGNORE_INDEX = -100


class _CrossEntropySum(torch.autograd.Function):
    """sum over rows of -log softmax(logits)[target]; ignored rows add nothing."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        step = loss_slice_rows(logits.shape[-1])  # two fp32 slices alive at a time
        for start in range(0, logits.shape[0], step):
            x = logits[start:start + step].to(torch.float32, copy=True)  # a copy even for fp32 logits
            y = targets[start:start + step]
            valid = y != ignore_index
            y = torch.where(valid, y, 0)[:, None]
            lse = torch.logsumexp(x, dim=-1, keepdim=True)
            total += ((lse - x.gather(1, y)).squeeze(1) * valid).sum()
            if want_grad:  # d/dx = softmax(x) - onehot(y), zero on ignored rows
                x.sub_(lse).exp_()
                x.scatter_add_(1, y, torch.full_like(y, -1, dtype=x.dtype))
                x.mul_(valid[:, None])
                grad[start:start + step] = x
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # In place: the graph is not kept (no retain_graph in training), so the buffer is used once.
        return grad.mul_(grad_total.to(grad.dtype)), None, None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                   shift_labels: torch.Tensor | None = None, **_kwargs) -> torch.Tensor:
    """Drop-in for transformers' ForCausalLMLoss (same arguments, same reduction)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    total = _CrossEntropySum.apply(logits.reshape(-1, vocab_size), targets, ignore_index)
    if num_items_in_batch is None:  # a mean over the counted tokens, as cross_entropy's "mean"
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
