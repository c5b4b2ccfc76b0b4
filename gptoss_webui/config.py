"""The typed configuration: the single source of truth shared by the UI, the CLI and the presets.

A *recipe* is one YAML file with a `train:` and a `serve:` section (presets/*.yaml, and the
config.yaml written into every run folder). Defaults follow ../shared/GPT-OSS-FACTS.md:
bf16, attention `auto`, LoRA on attention and expert parameters, gradient checkpointing on, ZeRO-2.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gptoss_webui.messages import Message, joined, say


class ConfigError(ValueError):
    """A problem the user fixes in the config or the data, worded for them; the base of every such error
    (data, LoRA targets, attention, launch checks, estimate), so the CLI prints them without a traceback."""


class _Strict(BaseModel):
    # Unknown keys are typos: refuse them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Precision = Literal["bf16", "fp32", "fp16"]
Attention = Literal["auto", "eager", "flex_attention", "sdpa", "flash_attention_2"]
DataFormat = Literal["auto", "messages", "alpaca", "text"]


MAX_LENGTH_LIMIT = 131072  # gpt-oss's context
# Marks a field whose value names a file or folder the app will read: the web UI refuses such paths outside its
# workspace and runs folders (ui/access.py), found through `file_fields`, not a list kept by hand.
READS_FILES = {"reads_files": True}


class DataConfig(_Strict):
    path: str = Field("demo:harmony", json_schema_extra=READS_FILES,
                      description="Local JSONL/JSON/CSV/Parquet file, a `datasets` name, "
                      "or demo:harmony (the shipped demo set)")
    format: DataFormat = Field("auto", description="messages (harmony chat), alpaca, text, or auto-detect")
    split: str = Field("train", description="Split to read from a `datasets` name")
    max_length: int = Field(2048, ge=16, le=MAX_LENGTH_LIMIT,
                            description="Tokens per example; longer ones are truncated")
    packing: bool = Field(True, description="Pack examples into blocks of up to max_length tokens (positions "
                          "restart and attention stays inside each example)")
    validation_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="Share of rows held out for eval")
    max_samples: int | None = Field(None, ge=1, description="Use only the first N rows")


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout; must be 0 with expert parameters")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="nn.Linear module names (attention projections)")
    expert_parameters: list[str] = Field(default_factory=lambda: ["gate_up_proj", "down_proj"],
                                         description="gpt-oss fused expert parameters (peft target_parameters)")
    expert_layers: list[int] | Literal["all"] = Field(
        default_factory=lambda: [7, 15, 23],
        description="Layers whose experts get LoRA ('all' or a list of indices); the cookbook uses 7, 15, 23")

    @model_validator(mode="after")
    def _dropout_with_experts(self) -> LoraConfig:
        if self.dropout > 0 and self.expert_parameters and self.expert_layers != []:
            raise ValueError(say("config.lora_dropout"))
        return self


class OptimConfig(_Strict):
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["cosine_with_min_lr", "cosine", "linear", "constant_with_warmup", "constant"] = \
        "cosine_with_min_lr"
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 means run `epochs`")
    micro_batch_size: int = Field(1, ge=1, description="Sequences per GPU per forward pass")
    gradient_accumulation_steps: int = Field(4, ge=1)
    seed: int = 42


class DeepSpeedConfig(_Strict):
    enabled: bool = Field(True, description="Launch with DeepSpeed (ZeRO-2 by default)")
    stage: Literal[2, 3] = Field(2, description="2 shards gradients + optimizer states (every GPU holds all "
                                 "weights); 3 also shards the weights, for models larger than one GPU")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory")
    offload_params: bool = Field(False, description="ZeRO-3 only: keep the weights in CPU memory")
    bucket_size: int = Field(200_000_000, ge=1_000_000, description="reduce/allgather bucket size (elements)")
    overlap_comm: bool = True

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError(say("config.offload_params"))
        return self


class TrainConfig(_Strict):
    model: str = Field("demo:tiny-gpt-oss", json_schema_extra=READS_FILES,
                       description="Local model folder, hub name already cached, or demo:tiny-gpt-oss / "
                       "demo:tiny-dense")
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    precision: Precision = Field("bf16", description="bf16 (default); fp16 is refused for gpt-oss")
    base_weights: Literal["auto", "mxfp4", "bf16"] = Field(
        "auto", description="mxfp4: an MXFP4 checkpoint's experts stay 4-bit on the GPU and are decoded a layer "
        "at a time (gpt-oss-20b: 12.8 GiB of weights instead of 39, steps about 0.8x as fast); bf16: decoded "
        "once at load; auto: bf16 where the estimate fits the GPU, else mxfp4. Checkpoints without MXFP4 experts "
        "load as stored")
    attention: Attention = Field("auto", description="auto picks per device and architecture")
    gradient_checkpointing: bool = True
    offload_activations: bool = Field(False, description="Keep the tensors saved for the backward (with "
                                      "checkpointing: each layer's input) in pinned CPU memory: longer sequences "
                                      "fit, and every step copies them out and back")
    compile: bool = Field(False, description="torch.compile each decoder layer (GPU): faster steps after a "
                          "one-time compile of about a minute")
    num_gpus: int | None = Field(None, ge=1, description="Ranks to launch; None = all visible GPUs "
                                 "(on a CPU machine: 1)")
    hostfile: str | None = Field(None, json_schema_extra=READS_FILES,
                                 description="DeepSpeed hostfile for several nodes (`host slots=N` lines); None = "
                                 "this machine only")
    gpu_memory_gib: float | None = Field(None, gt=0, description="Per-GPU memory for the estimate; "
                                         "None = read from the GPUs present")
    runs_dir: str = Field("runs", description="Folder that holds one folder per run")
    run_name: str | None = Field(None, description="Run folder name; None = generated from the time")
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps")
    save_total_limit: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _compile_not_under_zero3(self) -> TrainConfig:
        if self.compile and self.deepspeed.enabled and self.deepspeed.stage == 3:
            # ZeRO-3 gathers each layer's weights in module hooks, which would run inside the compiled layer;
            # only ZeRO-2 and no DeepSpeed were run with compile (bench/README.md).
            raise ValueError(say("config.compile_zero3"))
        return self

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError(say("config.run_name"))
        return v


# The vLLM server flags that serve/launch.py sets, and what sets them: serve.extra_args may not repeat them (vLLM
# would take the last one given, and the engine's state would no longer say what runs).
VLLM_FLAGS_SET_HERE = {
    "--model": "serve.model", "--served-model-name": "serve.model", "--host": "serve.host", "--port": "serve.port",
    "--dtype": "serve.dtype", "--max-model-len": "serve.max_model_len",
    "--tensor-parallel-size": "serve.tensor_parallel_size", "--max-num-seqs": "serve.max_concurrency",
    "--gpu-memory-utilization": "serve.gpu_memory_utilization", "--block-size": "serve.block_size",
    "--enforce-eager": "serve.enforce_eager", "--cudagraph-capture-sizes": "serve.max_concurrency",
    "--reasoning-parser": "serve.model", "--enable-lora": "serve.adapters", "--max-loras": "serve.max_loras",
    "--max-lora-rank": "serve.max_lora_rank", "--compilation-config.cudagraph-specialize-lora": "serve.base_graphs",
    "--lora-target-modules": "serve.model",
}


def vllm_flag(arg: str) -> str:
    """The flag an argument names, as vLLM reads it: --max_num_seqs=8 and --max-num-seqs 8 are both --max-num-seqs."""
    return arg.split("=", 1)[0].replace("_", "-")


class ServeConfig(_Strict):
    model: str = Field("demo:tiny-gpt-oss", json_schema_extra=READS_FILES,
                       description="Base or merged model folder to serve")
    adapters: dict[str, str] = Field(default_factory=dict, json_schema_extra=READS_FILES,
                                     description="name -> adapter folder, loaded at start")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(4096, ge=64)
    gpu_memory_utilization: float = Field(0.85, gt=0.05, le=0.98,
                                          description="Share of GPU memory vLLM may take (weights + KV cache)")
    cpu_kv_cache_gib: float = Field(2.0, gt=0, description="KV cache space on a CPU-only host")
    block_size: int | None = Field(None, ge=1, description="PagedAttention block size; None = vLLM's default")
    max_loras: int = Field(2, ge=1)
    max_lora_rank: int = Field(16, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_concurrency: int = Field(64, ge=1, le=1024, description="Requests the engine decodes at once (vLLM's "
                                 "--max-num-seqs); CUDA graphs are captured for batch sizes up to it; auto serves an "
                                 "adapter with expert LoRA the way measured faster at it (serve/policy.py)")
    enforce_eager: bool = Field(False, description="Skip graph capture: faster start, slower decode")
    base_graphs: bool = Field(True, description="With LoRA on, capture CUDA graphs for requests to the base model "
                              "too. Off: half the graphs and a faster start, but base requests decode without graphs, "
                              "many times slower (measured in bench/README.md)")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM server arguments, as on its command "
                                  "line (e.g. --moe-backend triton: MXFP4 experts run marlin unless told); not the "
                                  "flags the fields here set")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key_env: str = Field("GPTOSS_API_KEY", description="Environment variable holding the API key "
                             "(required when host is not loopback)")
    start_timeout_s: float = Field(600, gt=0)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    reasoning_effort: Literal["low", "medium", "high"] = "medium"

    @field_validator("extra_args", mode="before")
    @classmethod
    def _split_args(cls, v: Any) -> Any:
        """A string is split as a shell would (the Serve tab's box, `--set serve.extra_args='--x 1'`)."""
        return shlex.split(v) if isinstance(v, str) else v

    @field_validator("extra_args")
    @classmethod
    def _only_new_flags(cls, v: list[str]) -> list[str]:
        if v and not v[0].startswith("--"):
            raise ValueError(say("config.extra_args_flag", arg=v[0]))
        for arg in v:
            flag = vllm_flag(arg)
            if flag in VLLM_FLAGS_SET_HERE:
                raise ValueError(say("config.extra_args_set_here", flag=flag, field=VLLM_FLAGS_SET_HERE[flag]))
        return v

    @model_validator(mode="after")
    def _one_compilation_config(self) -> ServeConfig:
        """base_graphs off sets one key of vLLM's compilation config (dotted); a whole JSON one would replace it."""
        if not self.base_graphs and "--compilation-config" in {vllm_flag(arg) for arg in self.extra_args}:
            raise ValueError(say("config.compilation_config_json"))
        return self


class Recipe(_Strict):
    """What a preset file and a run's config.yaml hold: how to train, and how to serve the result."""

    description: str = ""
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    # --- YAML in and out -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(say("config.not_found", path=path))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = say("config.yaml_line", path=path, line=mark.line + 1) if mark else str(path)
            raise ConfigError(say("config.bad_yaml", where=where, problem=getattr(exc, "problem", exc))) from None
        if not isinstance(data, dict):
            raise ConfigError(say("config.not_mapping", path=path))
        return cls.from_dict(data, overrides, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None,
                  source: str | Message = "config") -> Recipe:
        data = _deep_copy(data)
        for item in overrides or []:
            apply_override(data, item)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source, overrides or [])) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        from gptoss_webui.runs import atomic_write_text

        atomic_write_text(Path(path), self.to_yaml())


# --- overrides and messages --------------------------------------------------------------------

def file_fields(model: BaseModel, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) for every READS_FILES field set in `model` and its sections; a dict field gives one
    entry per item (`serve.adapters.NAME`)."""
    found = []
    for name, info in type(model).model_fields.items():
        value, key = getattr(model, name), f"{prefix}{name}"
        if isinstance(value, BaseModel):
            found += file_fields(value, key + ".")
        elif (info.json_schema_extra or {}).get("reads_files") and value:
            found += [(f"{key}.{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
    return found


def in_section(items: list[str], section: str) -> list[str]:
    """`key=value` overrides as the CLI and the UI take them: a key not spelled out from the top (`train.`,
    `serve.`, `description`) belongs to `section`, so `lora.r=16` means `train.lora.r=16` for training."""
    return [item if item.split("=", 1)[0].strip().startswith(("train.", "serve.", "description")) else
            f"{section}.{item.strip()}" for item in items]


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` to a nested dict; the value is parsed as YAML (so 16, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(say("config.override_form", item=item))
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(say("config.override_empty", item=item))
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(say("config.override_not_section", item=item, part=part))
        node = child
    node[parts[-1]] = value


def _pydantic_kinds(ctx: dict[str, Any]) -> dict[str, Message]:
    """pydantic's common error kinds, worded from their context (ctx); each English template is pydantic's own
    text, and a message whose English comes out different from pydantic's is shown as pydantic words it."""
    # pydantic shows a bound of 0.0 as 0
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ctx.items()}
    return {
        "missing": say("config.pydantic.missing"),
        "greater_than": say("config.pydantic.greater_than", gt=ctx.get("gt")),
        "greater_than_equal": say("config.pydantic.greater_than_equal", ge=ctx.get("ge")),
        "less_than": say("config.pydantic.less_than", lt=ctx.get("lt")),
        "less_than_equal": say("config.pydantic.less_than_equal", le=ctx.get("le")),
        "int_parsing": say("config.pydantic.int_parsing"),
        "int_from_float": say("config.pydantic.int_from_float"),
        "int_type": say("config.pydantic.int_type"),
        "float_parsing": say("config.pydantic.float_parsing"),
        "float_type": say("config.pydantic.float_type"),
        "bool_parsing": say("config.pydantic.bool_parsing"),
        "bool_type": say("config.pydantic.bool_type"),
        "string_type": say("config.pydantic.string_type"),
        "list_type": say("config.pydantic.list_type"),
        "dict_type": say("config.pydantic.dict_type"),
        "model_type": say("config.pydantic.model_type", name=ctx.get("class_name")),
        "literal_error": say("config.pydantic.literal_error", expected=ctx.get("expected")),
    }


def _pydantic_message(err: dict[str, Any]) -> Message | str:
    """What pydantic says about one error, as a Message where we word that kind, else its English as is."""
    ctx = err.get("ctx") or {}
    if err["type"] == "value_error" and isinstance(ctx.get("error"), ValueError):
        args = ctx["error"].args  # our validators raise ValueError(say(...))
        if len(args) == 1 and isinstance(args[0], Message):
            return args[0]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":  # shown after "got <value>; ", so in lower case
        msg = f"{msg[0].lower()}{msg[1:]}"
    worded = _pydantic_kinds(ctx).get(err["type"])
    return worded if worded is not None and str(worded) == msg else msg


def format_validation_error(exc: ValidationError, source: str | Message, overrides: list[str] = ()) -> Message | None:
    """One line per error, each blamed on where the value came from: the `--set` item that set it, else `source`.
    The field path and the values stay as written; the words around them are in the reader's language."""
    set_by = {".".join(p for p in item.split("=", 1)[0].strip().split(".") if p): item for item in overrides}
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        field = path or say("config.top_level")
        item = next((v for k, v in set_by.items() if path == k or path.startswith(k + ".")), None) if path else None
        msg = _pydantic_message(err)
        if err["type"] == "extra_forbidden":
            parent = _model_at(Recipe, err["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            msg = say("config.unknown_field", allowed=allowed)
        elif err["type"] == "literal_error":
            msg = say("config.got", input=repr(err.get("input")), msg=msg)
        lines.append(say("config.error.set", item=item, field=field, msg=msg) if item else
                     say("config.error.source", source=source, field=field, msg=msg))
    return joined(lines, "config.lines")


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
