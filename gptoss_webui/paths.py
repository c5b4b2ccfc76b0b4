"""Where things live: the workspace (models, data, caches) and the package's own data files."""

from __future__ import annotations

import os
from pathlib import Path


def workspace_dir() -> Path:
    """Models and uploads; GPTOSS_WORKSPACE overrides the default ./workspace."""
    return Path(os.environ.get("GPTOSS_WORKSPACE", "workspace")).resolve()


def cache_dir() -> Path:
    return workspace_dir() / "cache"


def engine_state_file() -> Path:
    """The serving engine's state, one per workspace: the CLI and the UI both read and write it (serve/state.py),
    and the training queue reads which GPUs the engine holds."""
    return workspace_dir() / "engine.json"


def package_data() -> Path:
    return Path(__file__).parent / "data"
