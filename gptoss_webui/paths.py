"""Where things live: the workspace (models, data, caches) and the package's own data files."""

from __future__ import annotations

import os
from pathlib import Path


def workspace_dir() -> Path:
    """Models and uploads; GPTOSS_WORKSPACE overrides the default ./workspace."""
    return Path(os.environ.get("GPTOSS_WORKSPACE", "workspace")).resolve()


def cache_dir() -> Path:
    return workspace_dir() / "cache"


def package_data() -> Path:
    return Path(__file__).parent / "data"
