# Source on the GPU host, from the repo root: installs the carried wheels and sets the environment.
#   source bench/gpu/setup.sh
CARRY=${CARRY:-.gpu_carry}
# DS_BUILD_OPS=0: no op is compiled at install; FusedAdam's JIT build needs 9.0, not the image's 9.0a.
export DS_BUILD_OPS=0 TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # `import gptoss_webui` and `import bench` from the tree
export GPTOSS_WORKSPACE=${GPTOSS_WORKSPACE:-/tmp/gptoss-ws}
# The tokenizer files (for the checkpoints make_models writes) and the o200k ranks (for vLLM's harmony parser).
export TOKENIZER=${TOKENIZER:-/tmp/gptoss-tokenizer}
if [ -f "$CARRY/tokenizer.tar.xz" ]; then
  mkdir -p "$TOKENIZER" "$GPTOSS_WORKSPACE/cache/tiktoken"
  tar -xJf "$CARRY/tokenizer.tar.xz" -C "$TOKENIZER"
  mv "$TOKENIZER/o200k_base.tiktoken" "$GPTOSS_WORKSPACE/cache/tiktoken/"
fi
# A later call on the same host may come without .gpu_carry: the wheels an earlier call installed are still there.
if [ -d "$CARRY/wheels" ]; then
  python3 -m pip install -q --no-index --no-build-isolation --no-cache-dir --find-links "$CARRY/wheels" \
    deepspeed==0.19.8 pydantic==2.14.4 hjson
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --find-links "$CARRY/wheels" peft==0.21.2
else
  python3 -c "import deepspeed, pydantic" || { echo "no $CARRY and no earlier install on this host"; return 1; }
fi
# The launcher runs the `deepspeed` script that sits beside sys.executable; pip may have put it elsewhere.
PYBIN=$(python3 -c 'import os, sys; print(os.path.dirname(sys.executable))')
[ -x "$PYBIN/deepspeed" ] || ln -sf "$(command -v deepspeed)" "$PYBIN/deepspeed"
