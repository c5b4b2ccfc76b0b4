"""gpt-oss's experts for LoRA training: frozen weights in bf16 or MXFP4, LoRA as low-rank products.

`GroupedExperts` replaces transformers' GptOssExperts in every layer. Tokens are sorted by expert and each
projection is one grouped matmul (torch's grouped GEMM on a GPU). The frozen weight is either a bf16 tensor or
the checkpoint's MXFP4 blocks and scales, decoded just in time: in the forward pass and in the recomputation under
gradient checkpointing, and kept for the layer's backward (`_FrozenGroupedMatmul`) or decoded again there
(`_DecodeAgainGroupedMatmul`).
gpt-oss-20b holds at most one layer's experts in bf16 (1.5 GiB, or 0.99 GiB decoding again) instead of 39 GiB.

Expert LoRA computes y = x W + s (x A) B per expert, never W + s B A: no expert-sized copies, no expert-sized
weight gradient. `ExpertLoraFactors` holds A and B in peft's ParamWrapper layout (the same module nesting,
`lora_A`/`lora_B` dicts keyed by adapter name, the same shapes), so that peft saves, loads and merges the adapter,
and vLLM hot-loads it, exactly as an adapter trained with peft's own wrapper.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from gptoss_webui.mxfp4 import EXPERT_WEIGHTS, decode, load_gpu_kernel

ADAPTER = "default"  # peft's adapter name, part of every saved key
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group, w [G, in, out], offs = cumulative row counts -> [rows, out].

    torch's grouped GEMM on a GPU in bf16; elsewhere (the CPU, where its backward is missing) one matmul a group.
    """
    if x.is_cuda and w.dtype == torch.bfloat16 and _GROUPED_MM is not None:
        return _GROUPED_MM(x, w, offs=offs)
    bounds = itertools.pairwise([0, *offs.tolist()])
    return torch.cat([x[a:b] @ w[g] for g, (a, b) in enumerate(bounds)])


def _frozen_weight(weight: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[G, out, in]: decoded from MXFP4 codes (scales given), else a view of the bf16 [G, in, out] weight."""
    return decode(weight, scales, dtype) if scales is not None else weight.transpose(1, 2)


# Two autograd Functions, one per way of holding the weight for the backward, chosen in _project: no Python flag goes
# into the traced code (a compiled layer that cannot trace it runs its experts eagerly).
class _FrozenGroupedMatmul(torch.autograd.Function):
    """x @ W per group for a frozen W: bf16, or MXFP4 decoded in the forward and the decoded weight kept for the
    backward. Under gradient checkpointing the first forward's saved tensors are dropped, so only the recomputed
    layer's two decoded weights live until its backward (1.5 GiB for gpt-oss-20b): two decodes a step."""

    @staticmethod
    def forward(ctx, x, offs, weight, scales):
        w = _frozen_weight(weight, scales, x.dtype)
        # Both saved [G, in, out]. bf16: the parameter itself, not a view of it, which ZeRO-3 gathers again for the
        # backward (a view would hold on to the gathered storage).
        ctx.save_for_backward(offs, weight if scales is None else w.transpose(1, 2))
        return grouped_mm(x, w.transpose(1, 2), offs)

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        offs, saved = ctx.saved_tensors
        return grouped_mm(grad_y.contiguous(), saved.transpose(1, 2).to(grad_y.dtype), offs), None, None, None


class _DecodeAgainGroupedMatmul(torch.autograd.Function):
    """x @ W per group for a frozen MXFP4 W that only the codes are saved of: the backward decodes it again (a third
    decode a step), under another op name that a compiled layer does not merge with the forward's (mxfp4.decode), so
    one decoded weight is alive at a time: for cards without room for two. The estimator decides which Function
    (memory.estimate's keep_decoded)."""

    @staticmethod
    def forward(ctx, x, offs, blocks, scales):
        ctx.save_for_backward(offs, blocks, scales)
        return grouped_mm(x, decode(blocks, scales, x.dtype).transpose(1, 2), offs)

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        offs, blocks, scales = ctx.saved_tensors
        w = decode(blocks, scales, grad_y.dtype, again=True)
        return grouped_mm(grad_y.contiguous(), w, offs), None, None, None


class GroupedExperts(nn.Module):
    """One layer's experts: frozen weights and biases, sorted-token grouped matmuls, optional LoRA factors.

    Weights: `gate_up_proj` [E, hidden, 2 x inter] and `down_proj` [E, inter, hidden] as frozen bf16 parameters
    (transformers' layout), or `<name>_blocks`/`<name>_scales` MXFP4 buffers (the checkpoint's layout). The
    buffers are not persistent: the base model is never part of a training checkpoint.
    """

    def __init__(self, experts: nn.Module) -> None:
        """Sizes and SwiGLU constants from a transformers GptOssExperts (real or on the meta device)."""
        super().__init__()
        self.num_experts, self.hidden_size = experts.num_experts, experts.hidden_size
        self.intermediate_size = experts.intermediate_size
        self.alpha, self.limit = experts.alpha, experts.limit  # clamped SwiGLU
        self.mxfp4 = False
        self.keep_decoded = True  # MXFP4: _FrozenGroupedMatmul, else _DecodeAgainGroupedMatmul; the worker sets it

    @classmethod
    def from_transformers(cls, experts: nn.Module) -> GroupedExperts:
        """Take over a GptOssExperts' bf16 weights: the same Parameter objects (no copy; under ZeRO-3 they stay
        the partitioned parameters DeepSpeed knows)."""
        new = cls(experts)
        for name in (*EXPERT_WEIGHTS, *(f"{n}_bias" for n in EXPERT_WEIGHTS)):
            new.register_parameter(name, getattr(experts, name).requires_grad_(False))
        return new

    @classmethod
    def from_mxfp4(cls, experts: nn.Module, tensors: dict[str, torch.Tensor]) -> GroupedExperts:
        """From one layer's checkpoint tensors: <weight>_blocks, <weight>_scales, <weight>_bias."""
        new = cls(experts)
        new.mxfp4 = True
        if torch.cuda.is_available():
            load_gpu_kernel()  # now, not inside a compiled layer
        for name in EXPERT_WEIGHTS:
            new.register_buffer(f"{name}_blocks", tensors[f"{name}_blocks"], persistent=False)
            new.register_buffer(f"{name}_scales", tensors[f"{name}_scales"], persistent=False)
            new.register_parameter(f"{name}_bias", nn.Parameter(tensors[f"{name}_bias"], requires_grad=False))
        return new

    @property
    def device(self) -> torch.device:
        return self.down_proj_bias.device

    def shape(self, name: str) -> tuple[int, int, int]:
        """[experts, in, out] of a fused weight, as peft's ParamWrapper sees it."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        return (e, h, 2 * i) if name == "gate_up_proj" else (e, i, h)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gpt-oss's clamped SwiGLU on interleaved (gate, up) columns, as GptOssExperts computes it."""
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)

    def _project(self, name: str, x: torch.Tensor, offs: torch.Tensor, expert_of: torch.Tensor,
                 lora: dict[str, ExpertLoraFactors]) -> torch.Tensor:
        if self.mxfp4:
            weight, scales = getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales")
        else:
            weight, scales = getattr(self, name), None
        matmul = _DecodeAgainGroupedMatmul if scales is not None and not self.keep_decoded else _FrozenGroupedMatmul
        y = matmul.apply(x, offs, weight, scales)
        if name in lora:
            y = y + lora[name].delta(x, expert_of)
        return y + getattr(self, f"{name}_bias")[expert_of].to(y.dtype)

    def forward(self, hidden_states: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor,
                lora: dict[str, ExpertLoraFactors] | None = None) -> torch.Tensor:
        tokens, top_k = router_indices.shape
        flat = router_indices.reshape(-1)
        expert_of, order = torch.sort(flat, stable=True)
        x = hidden_states[order // top_k]
        # histc, not bincount: a fixed output size keeps torch.compile's graph whole.
        counts = torch.histc(flat.float() if flat.device.type == "cpu" else flat.int(), bins=self.num_experts,
                             min=0, max=self.num_experts - 1)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        lora = lora or {}
        h = self._apply_gate(self._project("gate_up_proj", x, offs, expert_of, lora))
        y = self._project("down_proj", h, offs, expert_of, lora)
        y = y * routing_weights.reshape(-1)[order, None].to(y.dtype)
        unsorted = torch.empty_like(y).index_copy_(0, order, y)
        return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


class ExpertLoraFactors(nn.Module, BaseTunerLayer):
    """The LoRA of one fused expert weight, laid out as peft's ParamWrapper: `lora_A[adapter]` = Linear(in, r*E),
    `lora_B[adapter]` = Linear(r*E, out), and the next wrapper (or the experts) as `base_layer`. peft nests one
    wrapper per targeted weight, the first weight of the module (gate_up_proj) innermost. As a peft tuner layer,
    peft's save and load see its weights as the adapter's."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, alpha: float) -> None:
        super().__init__()
        experts = base_layer.get_base_layer() if isinstance(base_layer, ExpertLoraFactors) else base_layer
        self.base_layer, self.parameter_name = base_layer, parameter_name
        self.num_experts, in_features, out_features = experts.shape(parameter_name)
        self.r, self.scaling = r, alpha / r
        device = experts.device
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(in_features, r * self.num_experts, bias=False,
                                                        device=device)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(r * self.num_experts, out_features, bias=False,
                                                        device=device)})
        # peft's default init: A as nn.Linear (Kaiming uniform, a=sqrt(5)), B zero, so training starts at the base.
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[ADAPTER].weight)

    def delta(self, x: torch.Tensor, expert_of: torch.Tensor) -> torch.Tensor:
        """scaling * (x A_e) B_e for each row of x (routed to expert e = expert_of[row]), in peft's layout:
        A_e = lora_A rows e*r .. e*r+r-1, B_e[k] = lora_B column k*E + e (ParamWrapper.get_delta_weight).

        Both products are dense over all experts' ranks (r*E columns: 256 for gpt-oss-20b at r=8), then a gather
        picks the row's expert: a few GFLOP, no expert-sized tensor, and no grouped GEMM, whose strides the
        factors' layout does not meet."""
        e, r = self.num_experts, self.r
        rows = x.shape[0]
        weight_a = self.lora_A[ADAPTER].weight.to(x.dtype)  # [E*r, in]
        weight_b = self.lora_B[ADAPTER].weight.to(x.dtype)  # [out, r*E]
        all_ranks = (x @ weight_a.t()).view(rows, e, r)
        xa = all_ranks.gather(1, expert_of.view(rows, 1, 1).expand(rows, 1, r)).view(rows, r, 1)
        spread = torch.zeros(rows, r, e, dtype=x.dtype, device=x.device)
        spread = spread.scatter(2, expert_of.view(rows, 1, 1).expand(rows, r, 1), xa)  # [rows, r, E]
        return self.scaling * (spread.view(rows, r * e) @ weight_b.t())

    def forward(self, hidden_states, router_indices, routing_weights, lora=None):
        return self.base_layer(hidden_states, router_indices, routing_weights,
                               {**(lora or {}), self.parameter_name: self})


def attach_expert_lora(experts: GroupedExperts, names: list[str], r: int, alpha: float) -> nn.Module:
    """Wrap a layer's experts with LoRA on `names`, nested in peft's order (the module's weight order)."""
    module: nn.Module = experts
    for name in (n for n in EXPERT_WEIGHTS if n in names):
        module = ExpertLoraFactors(module, name, r, alpha)
    return module
