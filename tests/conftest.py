"""Shared fixtures: the embedded demo (built once, cached in ./workspace) and a scratch runs dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("GPTOSS_WORKSPACE", str(REPO / "workspace"))


@pytest.fixture(scope="session")
def tiny_gpt_oss() -> Path:
    from gptoss_webui.demo import ensure_demo_model

    return ensure_demo_model("tiny-gpt-oss")


@pytest.fixture(scope="session")
def tiny_dense() -> Path:
    from gptoss_webui.demo import ensure_demo_model

    return ensure_demo_model("tiny-dense")


@pytest.fixture(scope="session")
def tiny_gpt_oss_mxfp4() -> Path:
    from gptoss_webui.demo import ensure_demo_model

    return ensure_demo_model("tiny-gpt-oss-mxfp4")
