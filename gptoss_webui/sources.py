"""Where a model or a dataset named in a recipe is: `demo:` names become the built demo folders and the shipped
demo dataset; anything else (a local path, a hub name) is passed through for the loader to find."""

from __future__ import annotations

from gptoss_webui.paths import package_data

DEMO_PREFIX = "demo:"


def resolve_model(spec: str) -> str:
    """Turn `demo:<name>` into the built folder (built on first use); any other spec is returned unchanged."""
    if spec.startswith(DEMO_PREFIX):
        from gptoss_webui.demo import ensure_demo_model

        return str(ensure_demo_model(spec[len(DEMO_PREFIX):]))
    return spec


def resolve_dataset(spec: str) -> str:
    """Turn `demo:<name>` into the shipped demo dataset's file; any other spec is returned unchanged."""
    if spec.startswith(DEMO_PREFIX):
        from gptoss_webui.demo import DEMO_DATASETS

        name = spec[len(DEMO_PREFIX):]
        if name not in DEMO_DATASETS:
            raise ValueError(f"unknown demo dataset '{name}'; known: {', '.join(DEMO_DATASETS)}")
        return str(package_data() / DEMO_DATASETS[name])
    return spec
