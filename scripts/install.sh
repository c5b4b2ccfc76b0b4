#!/usr/bin/env bash
# Create or reuse .venv with the stack that fits this machine; idempotent.
#   scripts/install.sh          app stack (GPU stack when nvidia-smi sees a GPU, else the CPU lock)
#   scripts/install.sh --test   the same plus the test tools and Debian's Chromium for browser tests
# The stamp file records what was installed: a second run with unchanged requirements does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPTOSS_VENV:-.venv}
WITH_TEST=0; [ "${1:-}" = "--test" ] && WITH_TEST=1

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then STACK=gpu; else STACK=cpu; fi
STACK=${GPTOSS_STACK:-$STACK}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# pip on these machines warns about every missing local index folder: keep its output readable.
PIP() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 \
          | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

want="$STACK $(cat requirements.txt requirements/cpu.lock | sha256sum | cut -c1-16)"
have=$(cat "$VENV/.stack" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  echo "[install] $STACK stack into $VENV (first run takes a few minutes)"
  if [ "$STACK" = cpu ]; then
    PIP install torch==2.13.0            # the CPU build; see ../shared/CPU-STACK.md
    PIP install --no-deps -r requirements/cpu.lock
    # DeepSpeed ships as an sdist; its CUDA ops are not built on the CPU.
    DS_BUILD_OPS=0 PIP install --no-deps --no-build-isolation deepspeed==0.19.8
  else
    PIP install -r requirements.txt
  fi
  PIP install --no-deps -e .
  echo "$want" > "$VENV/.stack"
fi

if [ "$WITH_TEST" = 1 ]; then
  PIP install --no-deps -r requirements/test.txt
  if [ ! -x /usr/bin/chromium ]; then
    echo "[install] Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[install] could not install chromium: browser tests will be skipped"
  fi
fi
echo "[install] ready: $VENV ($STACK)"
