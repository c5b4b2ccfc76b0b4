#!/usr/bin/env bash
# Install (or reuse) the environment, build the embedded demo on a CPU-only host, start the WebUI on
# http://127.0.0.1:7860. Extra arguments go to `python -m gptoss_webui ui` (e.g. --lang zh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ "$(cat .venv/.stack | cut -d' ' -f1)" = cpu ]; then
  .venv/bin/python -m gptoss_webui demo
fi
exec .venv/bin/python -m gptoss_webui ui "$@"
