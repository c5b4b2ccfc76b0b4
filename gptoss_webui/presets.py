"""The shipped presets (presets/*.yaml): list, load, and save a recipe as a new preset."""

from __future__ import annotations

from pathlib import Path

from gptoss_webui.config import ConfigError, Recipe

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


DEFAULT_PRESET = "tiny-cpu-demo"  # the embedded demo: what the CLI and every UI tab start from


def default_recipe() -> Recipe:
    """The default preset's recipe (a plain Recipe when the presets folder is missing)."""
    return load_preset(DEFAULT_PRESET) if DEFAULT_PRESET in preset_names() else Recipe()


def preset_names(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def preset_path(name: str, presets_dir: Path = PRESETS_DIR) -> Path:
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(preset_names(presets_dir))}")
    return path


def load_preset(name: str, overrides: list[str] | None = None) -> Recipe:
    return Recipe.from_yaml(preset_path(name), overrides)


def load_recipe(source: str, overrides: list[str] | None = None) -> Recipe:
    """A preset name or a YAML file path."""
    if source.endswith((".yaml", ".yml")) or "/" in source:
        return Recipe.from_yaml(source, overrides)
    return load_preset(source, overrides)
