#!/usr/bin/env bash
# Run HERE (the CPU machine, with network), once: fill .gpu_carry/ with what the GPU host cannot download.
# .gpu_carry/ is ignored through .git/info/exclude, so it travels only when a device call names it in `carry`.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
CARRY=.gpu_carry
PY=${PYTHON:-.venv/bin/python}
grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
mkdir -p "$CARRY/wheels"

# The GPU image (Python 3.12, ../shared/GPU-STACK.md) lacks deepspeed and pydantic; PyYAML, psutil, tqdm,
# msgpack, ninja, py-cpuinfo, einops and nvidia-ml-py are there already.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$CARRY/wheels" hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$CARRY/wheels" deepspeed==0.19.8  # an sdist only
# The image's peft is 0.21.0; requirements.txt pins 0.21.2 (pure Python).
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" peft==0.21.2

# The o200k_harmony tokenizer of the embedded demo (built offline by `python -m gptoss_webui demo`) and the o200k
# ranks that vLLM's harmony parser reads (TIKTOKEN_ENCODINGS_BASE), xz-compressed: 32 MB raw, about 5 MB packed.
WS="${GPTOSS_WORKSPACE:-workspace}"
[ -f "$WS/models/tiny-gpt-oss/tokenizer.json" ] || "$PY" -m gptoss_webui demo
tar -cf - -C "$WS/models/tiny-gpt-oss" tokenizer.json tokenizer_config.json chat_template.jinja \
  -C "$(cd "$WS/cache/tiktoken" && pwd)" o200k_base.tiktoken | xz -9 -T2 > "$CARRY/tokenizer.tar.xz"
rm -rf "$CARRY/tokenizer"
du -sh "$CARRY"  # the tree plus carried paths must stay under 64 MiB a call
