"""The training worker: one process per rank, started by the deepspeed launcher.

    deepspeed --num_gpus N --module gptoss_webui.train.worker --run runs/<name> [--resume-from CKPT]

`LoraFinetune` is the whole recipe in one class: setup (tokenizer, data, model, LoRA, Trainer under
DeepSpeed), train, save, with progress written to runs/<name>/events.jsonl by rank 0. SIGTERM asks
every rank to stop at the same step, save a checkpoint, and write a `stopped` event.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from gptoss_webui.config import ConfigError, Recipe, TrainConfig
from gptoss_webui.events import EventWriter
from gptoss_webui.runs import Run
from gptoss_webui.train.data import IGNORE_INDEX, Example
from gptoss_webui.train.supervise import log_tail

USER_ERRORS = (ConfigError, FileNotFoundError)


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels, "lengths": ex.lengths}


class DocumentCollator:
    """Batch examples or packed blocks with no attention mask: the examples are kept apart by position ids.

    Positions restart at 0 in every example, and each restart is a document boundary that no token attends
    across: for gpt-oss, train/attention.document_masks builds the masks from them (a flex_attention block mask
    on the GPU, the same mask dense under eager); other models' own forwards do it in transformers
    (masking_utils.find_packed_sequence_indices). A row's right padding is one more document (positions from 0,
    labels ignored) that no real token sees. Each example's first label is ignored: after the loss's shift it
    would be predicted from the previous example's last token. With flex_attention the width is rounded up to a
    multiple of 128: below 128 query tokens torch 2.11's inductor picks its flex *decoding* kernel, which fails
    to build for training (seen on H100).
    """

    def __init__(self, pad_id: int, multiple: int = 1, width: int | None = None) -> None:
        self.pad_id = pad_id
        self.multiple = multiple
        self.width = width  # every batch this wide (packed blocks): one shape, so the layers compile once

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(self.width or 0, *(len(b["input_ids"]) for b in batch))
        width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            start = 0
            for length in b.get("lengths", [n]):
                positions[i, start:start + length] = torch.arange(length)
                labels[i, start] = IGNORE_INDEX
                start += length
            positions[i, n:] = torch.arange(width - n)  # the padding: one more document
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def saved_tensors_place(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """Where the forward keeps what the backward needs: the GPU, or with offload_activations pinned CPU memory (torch's
    save_on_cpu; under checkpointing that is each layer's input, the recomputed layers are untouched). The backward
    brings each tensor back when it needs it, outside this context too."""
    if not cfg.offload_activations:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


class AdapterTrainer(Trainer):
    """The Trainer, saving only what LoRA trains, its forward keeping saved tensors where the config says.

    Under ZeRO-2 the Trainer's save_model first clones the whole state dict to the CPU (accelerate's get_state_dict):
    39 GiB of frozen bf16 weights on gpt-oss-20b, about 27 s a save (H200, 2026-12-01), for a 30 MB adapter. The
    adapter is the trainable parameters; ZeRO-3, whose parameters are sharded, keeps the Trainer's own path (it
    gathers only the trainable ones)."""

    def __init__(self, *args: Any, train_config: TrainConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_config = train_config

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        with saved_tensors_place(self.train_config):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_deepspeed_enabled and self.deepspeed.zero_optimization_stage() == 3:
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            adapter = {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
            self.model.save_pretrained(output_dir or self.args.output_dir, state_dict=adapter)


class StopRequest:
    """Set by SIGTERM/SIGINT; all ranks agree on it at a step boundary (a rank alone would deadlock)."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class ProgressCallback(TrainerCallback):
    """Turns the Trainer's logs and saves into events; asks the Trainer to stop when requested."""

    def __init__(self, events: EventWriter | None, stop: StopRequest, run: Run, start_info: dict[str, Any]):
        self.events, self.stop, self.run, self.start_info = events, stop, run, start_info
        self.stopped = False
        self.t0 = self.t_last = time.time()
        self.tokens_last = 0
        self.first_step: int | None = None
        self.t_step_end = self.t0
        self.step_lr: float | None = None

    def emit(self, type: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(type, **fields)

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step
        self.t0 = self.t_last = time.time()
        self.tokens_last = state.num_input_tokens_seen
        self.emit("start", total_steps=state.max_steps, resumed_from_step=state.global_step, **self.start_info)

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        # The rate this step will use. The Trainer logs the scheduler's rate after the step, and under DeepSpeed
        # (which steps the scheduler itself) transformers 5.17 logged the next step's rate.
        try:
            self.step_lr = lr_scheduler.get_last_lr()[0]
        except (AttributeError, AssertionError, IndexError):  # no scheduler yet (fp16 loss-scale warm-up)
            self.step_lr = None

    def on_step_end(self, args, state, control, **kwargs):
        self.t_step_end = time.time()
        if self.stop.agreed():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        now = time.time()
        if "loss" in logs:
            tokens = state.num_input_tokens_seen
            steps_done = state.global_step - (self.first_step or 0)
            elapsed = now - self.t0
            eta = (state.max_steps - state.global_step) * elapsed / steps_done if steps_done else None
            self.emit("step", step=state.global_step, total=state.max_steps, epoch=round(state.epoch or 0, 4),
                       loss=logs["loss"], lr=self.step_lr, grad_norm=logs.get("grad_norm"),
                       tokens_per_s=round((tokens - self.tokens_last) / max(now - self.t_last, 1e-9), 1),
                       peak_mem_gib=round(peak_memory_gib(), 3), elapsed_s=round(elapsed, 2),
                       eta_s=None if eta is None else round(eta, 1))
            self.t_last, self.tokens_last = now, tokens
        if "eval_loss" in logs:
            self.emit("eval", step=state.global_step, eval_loss=logs["eval_loss"])

    def on_save(self, args, state, control, **kwargs):
        # Saving is not training: keep its time out of the next step's tokens/s.
        self.t_last = time.time()
        path = self.run.checkpoints_dir / f"checkpoint-{state.global_step}"
        self.emit("checkpoint", step=state.global_step, path=str(path), save_s=round(self.t_last - self.t_step_end, 2))


def load_model(model_path: str, model_config, cfg: TrainConfig, attention: str):
    """Load the base weights for training (train/weights.py decides bf16 or MXFP4-resident experts), then
    `prepare_model`. Returns (model, base weights used, the reason for a fallback or "")."""
    from gptoss_webui.train.weights import load_base_model

    model, base_weights, note = load_base_model(model_path, model_config, cfg, attention)
    return prepare_model(model, cfg), base_weights, note


def prepare_model(model, cfg: TrainConfig):
    """Loss, gradient checkpointing, ZeRO-3 leaf modules, LoRA and compilation on a loaded model (shared
    with bench/train.py)."""
    from gptoss_webui.train.lora import apply_lora
    from gptoss_webui.train.loss import install_fused_loss
    from gptoss_webui.train.weights import CpuEmbedding

    install_fused_loss(model)
    if cfg.deepspeed.enabled and cfg.deepspeed.stage == 3:
        if model.config.model_type == "gpt_oss":
            # Ranks routing tokens to different experts must still gather the same parameters.
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [type(model.model.layers[0].mlp)])
    else:  # ZeRO-3 shards the embeddings instead
        model.set_input_embeddings(CpuEmbedding(model.get_input_embeddings()))
    if cfg.gradient_checkpointing:  # the loaders have turned the KV cache off
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg.lora)
    keep_decoded_experts(model, cfg)
    if cfg.compile:
        compile_layers(model)
    return model


def keep_decoded_experts(model, cfg: TrainConfig) -> None:
    """MXFP4 experts: keep the recomputed layer's decoded weights for its backward (one decode fewer a step)
    where the estimate says they fit, else decode again there (train/experts.py)."""
    from gptoss_webui.train.experts import GroupedExperts
    from gptoss_webui.train.memory import estimate_for_recipe

    experts = [m for m in model.modules() if isinstance(m, GroupedExperts) and m.mxfp4]
    if experts:
        keep = estimate_for_recipe(cfg.model_copy(update={"base_weights": "mxfp4"}), search_fix=False).keep_decoded
        for module in experts:
            module.keep_decoded = keep


def compile_layers(model) -> None:
    """torch.compile every decoder layer in place; checkpointing then recomputes the compiled layer."""
    # Sliding and full-attention layers, and each new sequence length, are separate graphs.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.get_base_model().model.layers:
        layer.compile()


class LoraFinetune:
    """The recipe: setup -> train -> save. Runs in every rank; only rank 0 writes events and files."""

    def __init__(self, run: Run, resume_from: str | None) -> None:
        self.run = run
        self.resume_from = resume_from
        self.recipe = Recipe.from_yaml(run.config_path)
        self.cfg: TrainConfig = self.recipe.train
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.events = EventWriter(run.events_path) if self.rank == 0 else None
        self.stop = StopRequest()

    # --- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from gptoss_webui.sources import resolve_model
        from gptoss_webui.train.attention import choose_attention
        from gptoss_webui.train.data import prepare

        cfg = self.cfg
        torch.manual_seed(cfg.optim.seed)
        self.model_path = resolve_model(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        t0 = time.time()
        # Bad data fails here, before the model loads.
        self.data = prepare(cfg.data, self.tokenizer, cfg.optim.seed, cfg.optim.micro_batch_size)
        self.setup_s = {"data": round(time.time() - t0, 2)}
        model_config = AutoConfig.from_pretrained(self.model_path)
        self.attention = choose_attention(cfg.attention, model_config.model_type, torch.cuda.is_available())
        # TrainingArguments first: under ZeRO-3 it makes from_pretrained load the weights already sharded.
        args = self._training_args()
        if cfg.deepspeed.enabled:
            # On the CPU, accelerate starts torch.distributed but not DeepSpeed's comm layer; ZeRO-3's zero.Init
            # (inside from_pretrained) would then see world size 1. This adopts the running group (a no-op on GPUs).
            import deepspeed

            deepspeed.init_distributed()
        t0 = time.time()
        model, self.base_weights, note = load_model(self.model_path, model_config, cfg, self.attention)
        self.setup_s["model"] = round(time.time() - t0, 2)  # load, LoRA, compile wrappers (compiling is in step 1)
        if note and self.rank == 0:
            print(f"note: {note}", flush=True)
        self.base_weights_note = note
        self.model = model
        self.trainer = AdapterTrainer(
            model=model,
            args=args,
            processing_class=self.tokenizer,  # its pad id counts the tokens trained, padding excluded
            train_dataset=ExampleDataset(self.data.train),
            eval_dataset=ExampleDataset(self.data.validation) if self.data.validation else None,
            data_collator=DocumentCollator(self.tokenizer.pad_token_id,
                                           multiple=128 if self.attention == "flex_attention" else 1,
                                           width=cfg.data.max_length if cfg.data.packing else None),
            callbacks=[ProgressCallback(self.events, self.stop, self.run, self._start_info(model))],
            train_config=cfg,
        )

    def _training_args(self):
        from transformers import TrainingArguments

        from gptoss_webui.train.zero import deepspeed_config

        cfg, o = self.cfg, self.cfg.optim
        scheduler_kwargs = {"min_lr_rate": 0.1} if o.lr_scheduler == "cosine_with_min_lr" else {}
        return TrainingArguments(
            output_dir=str(self.run.checkpoints_dir),
            deepspeed=deepspeed_config(cfg) if cfg.deepspeed.enabled else None,
            per_device_train_batch_size=o.micro_batch_size,
            per_device_eval_batch_size=o.micro_batch_size,
            gradient_accumulation_steps=o.gradient_accumulation_steps,
            learning_rate=o.learning_rate,
            lr_scheduler_type=o.lr_scheduler,
            lr_scheduler_kwargs=scheduler_kwargs,
            warmup_steps=o.warmup_ratio,  # a float below 1 is a ratio of the total steps
            weight_decay=o.weight_decay,
            max_grad_norm=o.max_grad_norm,
            num_train_epochs=o.epochs,
            max_steps=o.max_steps,
            bf16=cfg.precision == "bf16",
            fp16=cfg.precision == "fp16",
            gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=cfg.logging_steps,
            save_strategy="steps",
            save_steps=cfg.save_steps,
            save_total_limit=cfg.save_total_limit,
            eval_strategy="steps" if self.data.validation else "no",
            eval_steps=cfg.save_steps,
            seed=o.seed,
            data_seed=o.seed,
            report_to=[],
            include_num_input_tokens_seen="non_padding",  # real tokens, not the padding
            prediction_loss_only=True,  # eval reports the loss; train/loss.py returns no logits
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )

    def _start_info(self, model) -> dict[str, Any]:
        from gptoss_webui.train.weights import CpuEmbedding

        trainable, total = model.get_nb_trainable_parameters()
        # Weights that are no parameters: MXFP4 codes (two weights a byte) and the embeddings kept on the CPU.
        total += sum(2 * b.numel() for name, b in model.named_buffers() if name.endswith("_blocks"))
        total += sum(m.table.numel() for m in model.modules() if isinstance(m, CpuEmbedding))
        cfg = self.cfg
        return {
            "world_size": self.world_size, "model": cfg.model, "trainable_params": trainable,
            "total_params": total, "attention": self.attention, "data_format": self.data.format,
            "train_items": len(self.data.train), "validation_items": len(self.data.validation),
            "data": dataclasses.asdict(self.data.stats), "data_summary": str(self.data.stats.summary()),
            "base_weights": self.base_weights, "setup_s": self.setup_s,
            "base_weights_note": self.base_weights_note,
            "config": {"lora_r": cfg.lora.r, "lr": cfg.optim.learning_rate, "precision": cfg.precision,
                       "zero_stage": cfg.deepspeed.stage if cfg.deepspeed.enabled else None,
                       "gradient_checkpointing": cfg.gradient_checkpointing, "compile": cfg.compile,
                       "offload_activations": cfg.offload_activations, "max_length": cfg.data.max_length},
        }

    # --- train and save -------------------------------------------------------------------------
    def train(self) -> None:
        t0 = time.time()
        if self.stop.requested:
            self.emit("stopped", step=0, checkpoint=None)
            return
        self.trainer.train(resume_from_checkpoint=self.resume_from)
        step = self.trainer.state.global_step
        callback = next(c for c in self.trainer.callback_handler.callbacks if isinstance(c, ProgressCallback))
        if callback.stopped:
            latest = self.run.latest_checkpoint()
            self.emit("stopped", step=step, checkpoint=str(latest) if latest else None)
            return
        self.save()
        self.emit("done", step=step, adapter_path=str(self.run.adapter_dir), elapsed_s=round(time.time() - t0, 2))

    def save(self) -> None:
        self.trainer.save_model(str(self.run.adapter_dir))
        if self.rank == 0:
            self.tokenizer.save_pretrained(self.run.adapter_dir)
            (self.run.adapter_dir / "README.md").write_text(self._model_card(), encoding="utf-8")

    def _model_card(self) -> str:
        return (f"# LoRA adapter for {self.cfg.model}\n\nTrained with gptoss-webui "
                f"({self.trainer.state.global_step} steps, attention {self.attention}).\n\n"
                f"```yaml\n{self.recipe.to_yaml()}```\n")

    def emit(self, type: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(type, **fields)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True)
    parser.add_argument("--resume-from")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    run = Run(Path(args.run))
    recipe = LoraFinetune(run, args.resume_from)
    try:
        recipe.setup()
        recipe.train()
        return 0
    except USER_ERRORS as exc:
        recipe.emit("error", message=str(exc), log_tail="")
        print(f"error: {exc}", flush=True)
        return 2
    except Exception as exc:
        tb = traceback.format_exc()
        print(tb, flush=True)
        recipe.emit("error", message=f"{type(exc).__name__}: {exc}", log_tail=log_tail(run))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
