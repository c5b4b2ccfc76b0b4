"""The Train form <-> the typed Recipe: one row per field, no training logic.

Each `FormField` names a dotted path in `Recipe` (the same path `--set` takes on the CLI), its i18n
key and its widget. `recipe_from_form` starts from a base recipe (the preset or a run's config.yaml),
writes the widget values into it, applies the free-form `key=value` lines, and validates through
`Recipe.from_dict`, so the UI accepts exactly what the CLI accepts and reports errors the same way.
"""

from __future__ import annotations

import shlex
import typing
from dataclasses import dataclass
from typing import Any

from gptoss_webui.config import ConfigError, Recipe, ServeConfig, apply_override, in_section
from gptoss_webui.messages import say
from gptoss_webui.paths import workspace_dir

Widget = str  # int, float, check, radio, dropdown, multi, layers, text, args, model, data

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["gate_up_proj", "down_proj"]


@dataclass(frozen=True)
class FormField:
    path: str
    key: str
    widget: Widget
    choices: tuple[Any, ...] = ()
    group: str = ""
    optional: bool = False  # a number where empty or 0 means None ("detect" / "all")

    def to_widget(self, value: Any) -> Any:
        if self.widget == "layers":
            return value if value == "all" else ", ".join(str(i) for i in value or [])
        if self.widget == "args":  # a command line's arguments, quoted where needed
            return shlex.join(value or [])
        if self.widget in ("text", "model", "data"):
            return "" if value is None else str(value)
        return value

    def to_config(self, value: Any) -> Any:
        if self.widget == "layers":
            return parse_layers(value)
        if self.widget in ("int", "float"):
            if value in (None, "") or (self.optional and value == 0):
                return None
            return int(value) if self.widget == "int" else float(value)
        if self.widget in ("text", "model", "data"):
            return (value or "").strip() or None
        if self.widget == "args":
            return (value or "").strip()  # ServeConfig splits it as a shell would
        if self.widget == "multi":
            return list(value or [])
        return value


def parse_layers(raw: Any) -> list[int] | str:
    """`all`, or indices like `7, 15, 23`; an empty box means no expert layers."""
    text = str(raw or "").strip()
    if text.lower() == "all":
        return "all"
    try:
        return [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(say("config.expert_layers_form", got=repr(text))) from None


def config_choices(path: str) -> tuple[Any, ...]:
    """The values a `Literal` field of the Recipe allows, e.g. ("bf16", "fp32", "fp16") for train.precision: what a
    radio or dropdown offers, taken from the typed config so that the two never disagree."""
    model: Any = Recipe
    for part in path.split("."):
        annotation = model.model_fields[part].annotation
        model = annotation
    return typing.get_args(annotation)


def _F(path: str, key: str, widget: Widget, choices: tuple[Any, ...] = (), group: str = "",
       optional: bool = False) -> FormField:
    if widget in ("radio", "dropdown") and not choices:
        choices = config_choices(path)
    return FormField(path, key, widget, choices, group, optional)


FIELDS: list[FormField] = [
    _F("train.model", "train.model", "model", group="data"),
    _F("train.data.path", "train.data_path", "data", group="data"),
    _F("train.data.format", "train.data_format", "dropdown", group="data"),
    _F("train.data.max_length", "train.max_length", "int", group="data"),
    _F("train.data.packing", "train.packing", "check", group="data"),
    _F("train.lora.r", "train.lora_r", "int", group="lora"),
    _F("train.lora.alpha", "train.lora_alpha", "int", group="lora"),
    _F("train.lora.dropout", "train.lora_dropout", "float", group="lora"),
    _F("train.lora.target_modules", "train.lora_targets", "multi", tuple(ATTENTION_MODULES), "lora"),
    _F("train.lora.expert_parameters", "train.lora_experts", "multi", tuple(EXPERT_PARAMETERS), "lora"),
    _F("train.lora.expert_layers", "train.lora_layers", "layers", group="lora"),
    _F("train.gradient_checkpointing", "train.checkpointing", "check", group="memory"),
    _F("train.compile", "train.compile", "check", group="memory"),
    _F("train.offload_activations", "train.offload_activations", "check", group="memory"),
    _F("train.deepspeed.stage", "train.ds_stage", "radio", group="memory"),
    _F("train.deepspeed.offload_optimizer", "train.offload_optimizer", "check", group="memory"),
    _F("train.deepspeed.offload_params", "train.offload_params", "check", group="memory"),
    _F("train.precision", "train.precision", "dropdown", group="memory"),
    _F("train.base_weights", "train.base_weights", "radio", group="memory"),
    _F("train.attention", "train.attention", "dropdown", group="memory"),
    _F("train.optim.micro_batch_size", "train.micro_batch", "int", group="schedule"),
    _F("train.optim.gradient_accumulation_steps", "train.grad_accum", "int", group="schedule"),
    _F("train.optim.learning_rate", "train.lr", "float", group="schedule"),
    _F("train.optim.epochs", "train.epochs", "float", group="schedule"),
    _F("train.optim.max_steps", "train.max_steps", "int", group="schedule"),
    _F("train.save_steps", "train.save_steps", "int", group="schedule"),
    _F("train.num_gpus", "train.num_gpus", "int", group="gpus", optional=True),
    _F("train.gpu_memory_gib", "train.gpu_memory", "float", group="gpus", optional=True),
    _F("train.run_name", "train.run_name", "text", group="gpus"),
]
FIELD_BY_PATH = {f.path: f for f in FIELDS}

# The Serve tab's engine settings and the Chat tab's sampling settings: ServeConfig fields.
SERVE_FIELDS: list[FormField] = [
    _F("serve.model", "serve.model", "model"),
    _F("serve.max_model_len", "serve.max_model_len", "int"),
    _F("serve.max_concurrency", "serve.max_concurrency", "int"),
    _F("serve.gpu_memory_utilization", "serve.gpu_util", "float"),
    _F("serve.cpu_kv_cache_gib", "serve.cpu_kv", "float"),
    _F("serve.max_loras", "serve.max_loras", "int"),
    _F("serve.max_lora_rank", "serve.max_lora_rank", "int"),
    _F("serve.enforce_eager", "serve.eager", "check"),
    _F("serve.base_graphs", "serve.base_graphs", "check"),
    _F("serve.port", "serve.port", "int"),
    _F("serve.extra_args", "serve.extra_args", "args"),
]
CHAT_FIELDS: list[FormField] = [
    _F("serve.reasoning_effort", "chat.effort", "radio"),
    _F("serve.temperature", "chat.temperature", "float"),
    _F("serve.top_p", "chat.top_p", "float"),
    _F("serve.max_tokens", "chat.max_tokens", "int"),
]


def get_path(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def form_values(recipe: Recipe, fields: list[FormField] = FIELDS) -> list[Any]:
    data = recipe.model_dump(mode="json")
    return [f.to_widget(get_path(data, f.path)) for f in fields]


def parse_extra(text: str) -> list[str]:
    """The free-form box: one `key=value` per line (like --set); blank lines and # comments skipped."""
    lines = [ln.strip() for ln in (text or "").splitlines()]
    return in_section([ln for ln in lines if ln and not ln.startswith("#")], "train")


def recipe_from_form(base: dict[str, Any], values: list[Any], extra: str, runs_dir: str) -> Recipe:
    """Validate the form into a Recipe; raises ConfigError naming the field."""
    data = Recipe.model_validate(base).model_dump(mode="json") if base else Recipe().model_dump(mode="json")
    for field, value in zip(FIELDS, values, strict=True):
        set_path(data, field.path, field.to_config(value))
    for item in parse_extra(extra):
        apply_override(data, item)
    # The app owns where runs go (its --runs-dir), so the UI and the CLI find the same runs.
    data["train"]["runs_dir"] = str(runs_dir)
    return Recipe.from_dict(data, source=say("config.source_form"))


def serve_from_form(base: dict[str, Any], fields: list[FormField], values: list[Any]) -> ServeConfig:
    """A ServeConfig from a base serve section and the values of `fields` (SERVE_FIELDS/CHAT_FIELDS)."""
    data = {"serve": dict(base or {})}
    for field, value in zip(fields, values, strict=True):
        set_path(data, field.path, field.to_config(value))
    return Recipe.from_dict(data, source=say("config.source_form")).serve


def apply_to_form(values: list[Any], extra: str, overrides: list[str]) -> tuple[list[Any], str]:
    """Put `--set` style overrides (e.g. the estimate's suggested fix) into the form: fields that have a
    widget get the value, the rest are appended to the free-form box."""
    import yaml

    values = list(values)
    lines = [ln for ln in (extra or "").splitlines() if ln.strip()]
    for item in overrides:
        key, _, raw = item.partition("=")
        field = FIELD_BY_PATH.get(key.strip())
        if field is None:
            lines.append(item)
            continue
        index = FIELDS.index(field)
        values[index] = field.to_widget(yaml.safe_load(raw) if raw.strip() else None)
    return values, "\n".join(lines)


def workspace_choices(kind: str) -> list[str]:
    """What the model/data pickers list: demo names plus what is in workspace/models or workspace/data."""
    root = workspace_dir()
    if kind == "model":
        found = sorted(str(p) for p in (root / "models").glob("*") if (p / "config.json").is_file())
        from gptoss_webui.demo import DEMO_MODELS

        return [f"demo:{n}" for n in DEMO_MODELS] + [p for p in found
                                                      if p.rsplit("/", 1)[-1] not in DEMO_MODELS]
    suffixes = (".jsonl", ".json", ".csv", ".parquet")
    found = sorted(str(p) for p in (root / "data").rglob("*") if p.suffix in suffixes)
    return ["demo:harmony", *found]

