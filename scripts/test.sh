#!/usr/bin/env bash
# Install (or reuse) the environment with the test tools, then run ruff and the whole test suite.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k config   or   scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
.venv/bin/ruff check .
.venv/bin/hadolint Dockerfile
.venv/bin/python -m gptoss_webui demo >/dev/null
exec .venv/bin/python -m pytest -ra "$@"
