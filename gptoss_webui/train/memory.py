"""Per-GPU memory estimate for a LoRA run: a breakdown, a verdict, and the cheapest change that would fit.

Fast and side-effect free (no torch, no model load): the shapes come from gptoss_webui.architecture (a local
config.json, the hub cache, built-in tables from ../shared/GPT-OSS-FACTS.md, or the demo shapes).
The terms follow GPT-OSS-FACTS.md "Memory estimate"; the activation and logits constants are fitted on
the measured peaks in ../shared/GPU-STACK.md (tests/test_memory.py holds that table and the error bound).

The peak is whichever of two moments is larger: the loss (all saved activations plus the
logits and their gradients) or the backward of one layer (saved activations plus that layer recomputed,
its attention scores and expert-LoRA weights). Measured peaks are torch's allocated bytes; the verdict
adds the CUDA context and allocator fragmentation on top.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from gptoss_webui.architecture import Architecture, resolve_architecture
from gptoss_webui.config import MAX_LENGTH_LIMIT, LoraConfig, TrainConfig
from gptoss_webui.messages import Message, joined, say, text
from gptoss_webui.mxfp4 import BYTES_PER_WEIGHT, choose_base_weights

GIB = 2**30

# --- constants (each one says where it comes from) ------------------------------------------------
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# LoRA weights, their gradients and AdamW's two moments, all fp32 (FACTS "Memory estimate" 2).
LORA_WEIGHT_BYTES, LORA_GRAD_BYTES, ADAM_BYTES = 4, 4, 8
# transformers' RMSNorm upcasts its input to fp32 and autograd keeps that copy: 4 bytes per unit.
RMSNORM_SAVED_BYTES = 4
# Clamped-SwiGLU tensors kept per routed token, in units of intermediate_size (besides gate_up's own
# output): fitted on GPU-STACK's no-checkpointing rows (5.0 from flex at 4096, 5.2 from eager 1024/4096).
SWIGLU_SAVED = 5.0
# Eager attention keeps the softmax probabilities [b, heads, s, s+1] of every layer: fitted 1.00 from
# eager 1024 and 4096 without checkpointing.
EAGER_SAVED_SCORES = 1.0
# ... and while one layer's attention runs backward (after its recompute), about 3.25 more tensors of that
# size are alive (score gradients, softmax backward, the scaled scores): 4.24 in all, fitted on eager
# 8192 with checkpointing (the only measured row where the recomputed layer, not the loss, sets the peak).
EAGER_BACKWARD_SCORES = 3.25
# Logits and loss. Ours (train/loss.py) never holds the logits: one slice of rows at a time holds its logits in the
# model dtype, their fp32 copy and the gradient cast back (LOSS_SLICE_BYTES is the fp32 slice), and the gradient of
# the hidden states is kept. transformers' ForCausalLMLoss (the plain-HF baseline of bench/train.py, and GPU-STACK's
# rows) keeps the logits plus three fp32 tensors (log_softmax output, its gradient, the logits' gradient): bf16 gives
# 2 + 12 = 14 bytes per logit; GPU-STACK's flex rows at 4096 and 8192 (checkpointing on) imply 14.04.
LOSS_SLICE_BYTES = 256 * 2**20
LOGITS_FP32_TENSORS = 3
# Not part of torch's allocated peak, but part of what the card must hold.
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS workspace: 0.5-1 GiB (FACTS "Memory estimate" 6)
FRAGMENTATION = 0.05  # caching-allocator slack over the allocated peak (FACTS "Memory estimate" 6)
# DeepSpeed's documented rule: overlap_comm uses about 4.5x the reduce/allgather bucket size (ZeRO-2).
ZERO2_BUCKETS_OVERLAP, ZERO2_BUCKETS = 4.5, 2.0
# ZeRO-3 reduces gradients through reduce_bucket_size buffers (double-buffered with overlap_comm).
ZERO3_BUCKETS_OVERLAP, ZERO3_BUCKETS = 2.0, 1.0
# ZeRO-3 materialises the layer being computed and prefetches the next: 2.5 layers' worth, fitted on the two
# measured ZeRO-3 rows (gpt-oss-20b on 2 GPUs, with and without offload; tests/test_memory.py MEASURED_ZERO3).
ZERO3_LIVE_LAYERS = 2.5


# --- LoRA parameter count ------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraCount:
    attention: int  # all target_modules, all layers
    experts: int  # all target_parameters, expert layers only
    expert_layers: tuple[int, ...]
    notes: tuple[Message, ...] = ()

    @property
    def total(self) -> int:
        return self.attention + self.experts


def count_lora(lora: LoraConfig, arch: Architecture) -> LoraCount:
    """Exact trainable count as peft builds it. nn.Linear in->out at rank r: r*(in+out) (lora_A, lora_B).
    peft's ParamWrapper on a 3-D [E, in, out] parameter makes lora_A = Linear(in, r*E) and
    lora_B = Linear(r*E, out) (peft 0.21 tuners/lora/layer.py), i.e. r*E*(in+out)."""
    r, notes = lora.r, []
    shapes = arch.linear_shapes()
    names = list(shapes) if "all-linear" in lora.target_modules else lora.target_modules
    per_layer = 0
    for name in names:
        if name in shapes:
            fan_in, fan_out = shapes[name]
            per_layer += r * (fan_in + fan_out)
        elif name != "all-linear":
            notes.append(say("memory.note.unknown_module", name=name, model_type=arch.model_type))
    attention = per_layer * arch.layers

    experts, layers = 0, ()
    eshapes = arch.expert_shapes()
    wanted = [p for p in lora.expert_parameters if p in eshapes]
    for p in lora.expert_parameters:
        if p not in eshapes:
            notes.append(say("memory.note.unknown_expert_parameter", name=p, model_type=arch.model_type))
    if wanted:
        chosen = range(arch.layers) if lora.expert_layers == "all" else lora.expert_layers
        layers = tuple(sorted({i for i in chosen if 0 <= i < arch.layers}))
        outside = sorted({i for i in chosen if not 0 <= i < arch.layers})
        if outside:
            notes.append(say("memory.note.outside_layers", layers=str(outside), n=arch.layers))
        experts = len(layers) * sum(r * e * (a + b) for e, a, b in (eshapes[p] for p in wanted))
    return LoraCount(attention, experts, layers, tuple(notes))


# --- the estimate ----------------------------------------------------------------------------------

@dataclass
class Term:
    name: Message
    gib: float
    detail: Message | str = ""  # a bare formula needs no words
    counted: bool = True  # False: real, but not alive at the peak (shown for information)


@dataclass
class Fix:
    change: Message  # in words
    overrides: list[str]  # for --set (TrainConfig keys prefixed with train.)
    total_gib: float
    margin_gib: float


@dataclass
class Estimate:
    model: str
    setup: Message
    terms: list[Term]
    peak_allocated_gib: float  # what torch.cuda.max_memory_allocated would show
    total_gib: float  # + CUDA context + fragmentation: what the card must hold
    gpu_gib: float | None  # judged against; None = no GPU here and none configured
    world_size: int
    fits: bool
    margin_gib: float  # gpu - total; negative = over by that much; 0.0 when gpu_gib is None
    trainable_params: int
    total_params: int
    attention: str
    peak_at: Message  # the term that sets the peak
    base_weights: str = "bf16"  # the form the experts take: "auto" resolved here, for the worker too
    keep_decoded: bool = False  # MXFP4: the recomputed layer's decoded experts kept for its backward (the worker's)
    fix: Fix | None = None
    longest_max_length: int | None = None  # the longest data.max_length that fits, all else kept
    offloaded_gib: float = 0.0  # pinned CPU memory each rank's offloaded activations take (offload_activations)
    notes: list[Message] = field(default_factory=list)

    @property
    def verdict(self) -> Message:
        if self.gpu_gib is None:
            return say("memory.verdict.no_gpu", total=self.total_gib)
        if self.fits:
            return say("memory.verdict.fits", margin=self.margin_gib)
        over = say("memory.verdict.no_fit", total=self.total_gib, over=-self.margin_gib, gpu=self.gpu_gib)
        return say("memory.verdict.remedy", verdict=over, remedy=self.remedy)

    @property
    def remedy(self) -> Message | None:
        """What would make it fit: the cheapest fix, or that none was found; None when it fits."""
        if self.fits:
            return None
        if self.fix is None:
            return say("memory.no_fix")
        return say("memory.fix", change=self.fix.change, overrides=" --set ".join(self.fix.overrides),
                   total=self.fix.total_gib, margin=self.fix.margin_gib)

    @property
    def longest(self) -> Message | None:
        """What would fit with everything else kept: the longest max_length."""
        return say("memory.longest", tokens=self.longest_max_length) if self.longest_max_length else None

    def report(self, lang: str = "en") -> str:
        """The breakdown, the verdict and the notes as monospace text, worded in `lang`."""
        names = [t.name.render(lang) for t in self.terms]
        total, gpu = say("memory.report.total").render(lang), say("memory.report.gpu").render(lang)
        width = max(map(_width, [*names, total, gpu])) + 2
        lines = [say("memory.report.head", model=self.model, params=self.total_params / 1e9,
                     trainable=self.trainable_params, pct=100 * self.trainable_params / self.total_params).render(lang),
                 say("memory.report.setup", setup=self.setup).render(lang), ""]
        for t, name in zip(self.terms, names, strict=True):
            value = f"{t.gib:8.2f} GiB " if t.counted else f"{'(' + format(t.gib, '.2f'):>9} GiB)"
            lines.append(f"  {_pad(name, width)}{value} {text(t.detail, lang)}".rstrip())
        lines.append(f"  {_pad(total, width)}{self.total_gib:8.2f} GiB  "
                     + say("memory.report.peak", peak=self.peak_at).render(lang))
        if self.gpu_gib is not None:
            lines.append(f"  {_pad(gpu, width)}{self.gpu_gib:8.2f} GiB")
        lines += ["", self.verdict.render(lang)]
        if self.longest:
            lines.append(self.longest.render(lang))
        lines += [say("memory.report.note", note=n).render(lang) for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, every message in English."""
        return {**_plain(self), "verdict": str(self.verdict)}


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return str(value)
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _width(text: str) -> int:
    """Columns `text` takes in a monospace font: CJK characters take two, so the breakdown stays aligned."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def resolve_attention(requested: str, model_type: str, on_gpu: bool) -> str:
    """What `auto` becomes; other values are estimated as given (refusals are the launcher's job)."""
    from gptoss_webui.train.attention import choose_attention

    return requested if requested != "auto" else choose_attention("auto", model_type, on_gpu)


def _layer_saved_bytes_per_token(arch: Architecture, p: int) -> float:
    """Activations one layer keeps for backward, per token, excluding eager attention scores."""
    h, i = arch.hidden, arch.intermediate
    norms = 2 * RMSNORM_SAVED_BYTES * h
    # normed input of q/k/v, q and k after rope, v, attention output (o_proj input); lse per head (fp32)
    attention = p * (h + 2 * arch.q_dim + 2 * arch.kv_dim) + 4 * arch.heads
    if arch.experts:  # per routed copy: gathered input, gate_up output, SwiGLU tensors, down output
        mlp = arch.experts_per_token * p * (2 * h + (2 + SWIGLU_SAVED) * i) + 2 * 4 * arch.experts
    else:  # input, gate, up, act(gate), product
        mlp = p * (h + 4 * i)
    return norms + attention + mlp


def loss_slice_rows(vocab: int) -> int:
    """Rows of logits that train/loss.py turns into fp32 at a time."""
    return max(1, LOSS_SLICE_BYTES // (4 * vocab))


def estimate(train_cfg: TrainConfig, arch: Architecture, gpu_gib: float | None, world_size: int, *,
             on_gpu: bool | None = None, search_fix: bool = True, plain_hf: bool = False,
             keep_decoded: bool | None = None) -> Estimate:
    """Per-GPU memory of train_cfg on `world_size` GPUs of `gpu_gib` each (None: nothing to judge against,
    fits=True). on_gpu decides what attention `auto` becomes (default: gpu_gib is not None); search_fix=False
    skips the search for a fix when it does not fit. plain_hf: estimate plain transformers + peft instead of our
    setup (its loss, its input embeddings on the GPU): the baseline that bench/train.py measures beside ours.
    keep_decoded (MXFP4 experts under checkpointing; None: kept where that fits, the faster way) is decided here
    for the worker too (train/experts.py)."""
    cfg, n = train_cfg, max(1, world_size)
    on_gpu = gpu_gib is not None if on_gpu is None else on_gpu
    p = DTYPE_BYTES[cfg.precision]
    ds = cfg.deepspeed
    stage = ds.stage if ds.enabled else 0
    offload_params = stage == 3 and ds.offload_params
    offload_optimizer = stage > 0 and ds.offload_optimizer
    b, s = cfg.optim.micro_batch_size, cfg.data.max_length
    tokens = b * s
    attention = resolve_attention(cfg.attention, arch.model_type, on_gpu)
    quadratic = attention == "eager"
    notes: list[Message] = []
    if arch.model_type == "gpt_oss" and attention in ("sdpa", "flash_attention_2"):
        notes.append(say("memory.note.attention_refused", attention=attention))

    lora = count_lora(cfg.lora, arch)
    notes += lora.notes
    P = lora.total

    # 1. base weights (FACTS 1): a full copy per GPU unless ZeRO-3 shards or offloads them; MXFP4-resident
    # experts (train/weights.py) hold 4.25 bits a weight.
    base_weights, fallback = choose_base_weights(cfg, arch.mxfp4_experts)
    if fallback:
        notes.append(fallback)
    if base_weights == "auto":  # bf16 where it fits (the faster path: bench/README.md), else MXFP4
        bf16 = estimate(cfg.model_copy(update={"base_weights": "bf16"}), arch, gpu_gib, world_size, on_gpu=on_gpu,
                        search_fix=False, plain_hf=plain_hf)
        base_weights = "bf16" if bf16.fits else "mxfp4"
        notes.append(say("memory.note.auto_bf16") if bf16.fits else
                     say("memory.note.auto_mxfp4", total=bf16.total_gib))
    mxfp4 = base_weights == "mxfp4"
    expert_weights = arch.layers * arch.expert_params_per_layer if mxfp4 else 0
    weights_all = ((arch.total_params - expert_weights) * p + expert_weights * BYTES_PER_WEIGHT) / GIB
    # The frozen input embeddings stay in CPU memory (train/weights.py), except under ZeRO-3, which shards them.
    embeddings_on_cpu = stage != 3 and not plain_hf
    if embeddings_on_cpu:
        weights_all -= arch.embedding_params * p / GIB
    live = min(arch.total_params, ZERO3_LIVE_LAYERS * max(arch.layer_params, arch.embedding_params)) * p / GIB
    terms = []
    base = say("memory.term.base_weights")
    if offload_params:
        terms.append(Term(base, 0.0, say("memory.detail.offloaded", gib=weights_all)))
    elif stage == 3:
        terms.append(Term(base, weights_all / n, say("memory.detail.sharded", gib=weights_all, n=n)))
    elif mxfp4:
        terms.append(Term(base, weights_all, say("memory.detail.mxfp4", gib=expert_weights * BYTES_PER_WEIGHT / GIB,
                                                 precision=cfg.precision)))
    else:
        terms.append(Term(base, weights_all, say("memory.detail.full_copy", precision=cfg.precision)))
    if stage == 3:
        terms.append(Term(say("memory.term.zero3_layers"), live, say("memory.detail.zero3_layers",
                                                                     layers=ZERO3_LIVE_LAYERS)))

    # 2. LoRA weights + grads + Adam (FACTS 2): ZeRO-2/3 shard grads and Adam, ZeRO-3 the weights too.
    shard = n if stage else 1
    lora_bytes = P * (LORA_WEIGHT_BYTES / (n if stage == 3 else 1) + LORA_GRAD_BYTES / shard
                      + (0 if offload_optimizer else ADAM_BYTES / shard))
    terms.append(Term(say("memory.term.lora"), lora_bytes / GIB,
                      say("memory.detail.lora_offloaded", params=P) if offload_optimizer
                      else say("memory.detail.lora", params=P)))

    # 3-5. activations, the layer in backward, logits: peak = max(loss, one layer's backward).
    per_layer = _layer_saved_bytes_per_token(arch, p) * tokens
    scores = b * arch.heads * s * (s + 1) * p if quadratic else 0.0  # one [b, heads, s, s+1] tensor
    # MXFP4 (train/experts.py): the recomputed layer's decoded expert weights kept for its backward, else one
    # decoded at a time. Expert LoRA adds only rank-sized activations: it never builds W + B.A.
    keep = mxfp4 and cfg.gradient_checkpointing and keep_decoded is not False
    expert_sizes = [e * a * o * p for e, a, o in arch.expert_shapes().values()] if mxfp4 else [0]
    decoded = sum(expert_sizes) if keep else max(expert_sizes)
    final = tokens * arch.hidden * (RMSNORM_SAVED_BYTES + p)  # final norm + lm_head input
    if cfg.gradient_checkpointing:
        saved = arch.layers * tokens * arch.hidden * p + final
        saved_detail = say("memory.detail.checkpoints", layers=arch.layers, b=b, s=s, hidden=arch.hidden, p=p)
        layer = per_layer + (EAGER_SAVED_SCORES + EAGER_BACKWARD_SCORES) * scores + decoded
        layer_name = say("memory.term.recomputed_layer")
    else:
        saved = arch.layers * (per_layer + EAGER_SAVED_SCORES * scores) + final
        saved_detail = say("memory.detail.all_layers", layers=arch.layers)
        layer = EAGER_BACKWARD_SCORES * scores + decoded
        layer_name = say("memory.term.layer_backward")
    if not quadratic:  # flex: gradients of q, k, v and the output, one more copy of them
        layer += p * (2 * arch.q_dim + 2 * arch.kv_dim) * tokens
    n_scores = EAGER_BACKWARD_SCORES + (EAGER_SAVED_SCORES if cfg.gradient_checkpointing else 0)
    layer_detail = (say("memory.detail.eager_scores", n=n_scores, b=b, heads=arch.heads, s=s, p=p) if quadratic
                    else say("memory.detail.linear", attention=attention))
    if decoded:
        layer_detail = (say("memory.detail.decoded_kept", detail=layer_detail, gib=decoded / GIB) if keep
                        else say("memory.detail.decoded", detail=layer_detail, gib=decoded / GIB))
    if plain_hf:
        logits = tokens * arch.vocab * (p + 4 * LOGITS_FP32_TENSORS)
        logits_detail = say("memory.detail.hf_logits", b=b, s=s, vocab=arch.vocab, p=p, fp32=4 * LOGITS_FP32_TENSORS)
    else:
        rows = min(tokens, loss_slice_rows(arch.vocab))
        logits = rows * arch.vocab * (4 + 2 * p) + tokens * arch.hidden * p
        logits_detail = say("memory.detail.sliced_logits", rows=rows, vocab=arch.vocab, p=p)
    offloaded = 0.0
    if cfg.offload_activations:
        # Pinned CPU memory holds what the forward saves (worker.saved_tensors_place); the backward brings back one
        # layer's input at a time, and the loss its hidden states.
        back, offloaded = tokens * arch.hidden * p, saved / GIB
        terms.append(Term(say("memory.term.saved_offloaded"), saved / GIB, saved_detail, counted=False))
        saved, saved_detail = back + final, say("memory.detail.saved_back", b=b, s=s, hidden=arch.hidden, p=p)
    loss_peak = logits >= layer
    loss_name = say("memory.term.logits")
    terms.append(Term(say("memory.term.saved"), saved / GIB, saved_detail))
    terms.append(Term(loss_name, logits / GIB, logits_detail, counted=loss_peak))
    terms.append(Term(layer_name, layer / GIB, layer_detail, counted=not loss_peak))

    # 6. overhead: DeepSpeed buckets, then context and fragmentation (not in torch's allocated peak).
    if stage:
        k = {2: (ZERO2_BUCKETS, ZERO2_BUCKETS_OVERLAP), 3: (ZERO3_BUCKETS, ZERO3_BUCKETS_OVERLAP)}[stage]
        k = k[ds.overlap_comm]
        terms.append(Term(say("memory.term.buckets"), k * ds.bucket_size * p / GIB,
                          f"{k:g} x {ds.bucket_size:,} x {p} B"))
    allocated = sum(t.gib for t in terms if t.counted)
    if on_gpu:
        terms.append(Term(say("memory.term.cuda"), CUDA_CONTEXT_GIB, say("memory.detail.cuda")))
    terms.append(Term(say("memory.term.fragmentation", share=FRAGMENTATION), FRAGMENTATION * allocated,
                      say("memory.detail.fragmentation")))
    total = sum(t.gib for t in terms if t.counted)

    fits = gpu_gib is None or total <= gpu_gib
    margin = 0.0 if gpu_gib is None else gpu_gib - total
    zero = [say("memory.setup.zero", stage=stage) if stage else say("memory.setup.no_deepspeed")]
    zero += [say("memory.setup.offload_params")] if offload_params else []
    zero += [say("memory.setup.offload_optimizer")] if offload_optimizer else []
    gpus = say("memory.setup.gpus", n=n) if n > 1 else say("memory.setup.gpu", n=n)
    checkpointing = (say("memory.setup.checkpointing_on") if cfg.gradient_checkpointing
                     else say("memory.setup.checkpointing_off"))
    setup = say("memory.setup", gpus=gpus, zero=joined(zero, "memory.plus"), precision=cfg.precision,
                attention=attention, checkpointing=checkpointing, b=b, s=s)
    est = Estimate(model=cfg.model, setup=setup, terms=terms, peak_allocated_gib=allocated,
                   total_gib=total, gpu_gib=gpu_gib, world_size=n, fits=fits, margin_gib=margin,
                   trainable_params=P, total_params=arch.total_params, attention=attention,
                   peak_at=loss_name if loss_peak else layer_name, base_weights=base_weights, keep_decoded=keep,
                   offloaded_gib=offloaded, notes=notes)
    if keep and not fits and keep_decoded is None:  # decoding again in the backward may fit: slower, not out
        slower = estimate(cfg, arch, gpu_gib, world_size, on_gpu=on_gpu, search_fix=search_fix, plain_hf=plain_hf,
                          keep_decoded=False)
        slower.notes.append(say("memory.note.decode_again", gib=(decoded - max(expert_sizes)) / GIB))
        return slower
    if not fits and search_fix:
        est.fix = find_fix(cfg, arch, gpu_gib, n, on_gpu)
    if search_fix and gpu_gib is not None:
        est.longest_max_length = longest_max_length(cfg, arch, gpu_gib, n, on_gpu)
    return est


LENGTH_STEP = 1024
# The longest length is promised with this share of the card kept free on top of the estimate's total. At these
# lengths the allocator reserves up to 9.7 % over the allocated peak (H200 capped at 79 GiB, bf16 experts, DeepSpeed
# off: 65,536 and 76,800 tokens trained, reserving 70.06 and 75.53 GiB; 86,016 ran out of memory although its total,
# 76.9 GiB, fitted; bench/README.md, 2026-12-01), where the total counts 5 % (FRAGMENTATION): 1.05 x 1.05 covers it.
LONGEST_LENGTH_MARGIN = 0.05


def longest_max_length(cfg: TrainConfig, arch: Architecture, gpu_gib: float, n: int, on_gpu: bool) -> int | None:
    """The longest data.max_length (a multiple of LENGTH_STEP) at which this config fits with LONGEST_LENGTH_MARGIN
    to spare, everything else kept; None when not even LENGTH_STEP tokens do. Every term grows with the length,
    so a bisection finds it."""
    def fits(length: int) -> bool:
        new = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": length})})
        total = estimate(new, arch, gpu_gib, n, on_gpu=on_gpu, search_fix=False).total_gib
        return total * (1 + LONGEST_LENGTH_MARGIN) <= gpu_gib

    lo, hi = 0, MAX_LENGTH_LIMIT // LENGTH_STEP  # in steps: lo fits (or is 0); past hi nothing fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * LENGTH_STEP) else (lo, mid - 1)
    return lo * LENGTH_STEP or None


# --- the cheapest fix ------------------------------------------------------------------------------

MIN_MAX_LENGTH = 256  # shorter than this, a chat example rarely survives truncation


@dataclass(frozen=True)
class _Change:
    words: Message
    values: dict[str, Any]  # dotted TrainConfig keys


def _steps(cfg: TrainConfig, arch: Architecture, n: int, on_gpu: bool) -> list[list[_Change]]:
    """Changes in the order of what they cost (speed, data, hardware); each step's alternatives go from
    mild to strong."""
    ds, steps = cfg.deepspeed, []
    if arch.mxfp4_experts and cfg.base_weights == "bf16":  # no cost: the released weights, as fast or faster
        steps.append([_Change(say("memory.change.mxfp4"), {"base_weights": "mxfp4"})])
    if not cfg.gradient_checkpointing:
        steps.append([_Change(say("memory.change.checkpointing"), {"gradient_checkpointing": True})])
    if on_gpu and arch.model_type == "gpt_oss" and cfg.attention == "eager":
        steps.append([_Change(say("memory.change.flex"), {"attention": "flex_attention"})])
    mb, gas, alts = cfg.optim.micro_batch_size, cfg.optim.gradient_accumulation_steps, []
    new = mb
    while new > 1:
        new //= 2
        new_gas = max(1, round(gas * mb / new))
        alts.append(_Change(say("memory.change.micro_batch", mb=mb, new=new, gas=gas, new_gas=new_gas),
                            {"optim.micro_batch_size": new, "optim.gradient_accumulation_steps": new_gas}))
    steps.append(alts)
    if on_gpu and not cfg.offload_activations:  # slower steps, the same data: before a shorter max_length
        steps.append([_Change(say("memory.change.offload_activations"), {"offload_activations": True})])
    length, s, alts = cfg.data.max_length, cfg.data.max_length // 2, []
    while s >= MIN_MAX_LENGTH:
        alts.append(_Change(say("memory.change.max_length", length=length, new=s), {"data.max_length": s}))
        s //= 2
    steps.append(alts)
    if not (ds.enabled and ds.offload_optimizer):
        steps.append([_Change(say("memory.change.offload_optimizer"),
                              {"deepspeed.enabled": True, "deepspeed.offload_optimizer": True})])
    zero3 = {"deepspeed.enabled": True, "deepspeed.stage": 3}
    if not (ds.enabled and ds.stage == 3):
        steps.append([_Change(say("memory.change.zero3"), zero3)])
    if not (ds.enabled and ds.offload_params):
        steps.append([_Change(say("memory.change.offload_params"), {**zero3, "deepspeed.offload_params": True})])
    steps.append([_Change(say("memory.change.more_gpus", n=m), {"num_gpus": m, **zero3})
                  for m in (2 * n, 4 * n, 8 * n)])
    return [step for step in steps if step]


def _apply(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig | None:
    data = cfg.model_dump()
    for key, value in values.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    try:
        return TrainConfig.model_validate(data)
    except ValueError:  # pydantic's ValidationError: a combination the config refuses
        return None


def _get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _override(key: str, value: Any) -> str:
    return f"train.{key}={str(value).lower() if isinstance(value, bool) else value}"


def find_fix(cfg: TrainConfig, arch: Architecture, gpu_gib: float, n: int, on_gpu: bool) -> Fix | None:
    """Walk the steps of _steps in order, each earlier step kept at full strength, until one fits; then
    drop each earlier step again, or soften it to its mildest alternative that still fits."""
    def trial(changes: list[_Change]) -> Estimate | None:
        values = {k: v for ch in changes for k, v in ch.values.items()}
        new = _apply(cfg, values)
        if new is None:
            return None
        est = estimate(new, arch, gpu_gib, int(values.get("num_gpus", n)), on_gpu=on_gpu, search_fix=False)
        return est if est.fits else None

    passed: list[list[_Change]] = []
    for step in _steps(cfg, arch, n, on_gpu):
        for last in step:
            chosen: list[_Change | None] = [alts[-1] for alts in passed]
            if (est := trial([*chosen, last])) is None:
                continue
            for i in reversed(range(len(passed))):
                for option in [None, *passed[i]]:  # not needed at all, else as mild as possible
                    changes = [c for c in [*chosen[:i], option, *chosen[i + 1:], last] if c is not None]
                    if smaller := trial(changes):
                        chosen[i], est = option, smaller
                        break
            changes = [c for c in [*chosen, last] if c is not None]
            current = cfg.model_dump()
            values = {k: v for ch in changes for k, v in ch.values.items() if _get(current, k) != v}
            return Fix(joined((ch.words for ch in changes), "memory.plus"),
                       [_override(k, v) for k, v in values.items()], est.total_gib, est.margin_gib)
        passed.append(step)
    return None


# --- entry point for the CLI and the UI ------------------------------------------------------------

def estimate_for_recipe(train_cfg: TrainConfig, search_fix: bool = True) -> Estimate:
    """Judge train_cfg against train.gpu_memory_gib, else the smallest GPU here; world size = train.num_gpus,
    else the GPUs here, else 1. On a CPU-only host with no gpu_memory_gib, the numbers are computed and
    `fits` is True (the CPU demo trains in host memory)."""
    arch = resolve_architecture(train_cfg.model)
    found = []
    if train_cfg.gpu_memory_gib is None or train_cfg.num_gpus is None:
        from gptoss_webui.hardware import gpus

        found = gpus()
    gpu_gib = train_cfg.gpu_memory_gib or (min(g.total_gib for g in found) if found else None)
    world = train_cfg.num_gpus or len(found) or 1
    return estimate(train_cfg, arch, gpu_gib, world, search_fix=search_fix)
