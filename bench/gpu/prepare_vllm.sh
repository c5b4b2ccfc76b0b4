#!/usr/bin/env bash
# Run HERE (the CPU machine, with network), once: vLLM 0.26.0 for the GPU host, whose image has torch 2.11 /
# CUDA 13 but no vLLM and no network. The wheel (288 MiB) and the 24 small packages vLLM imports that the image
# lacks go trimmed and xz-compressed, split into three parts that each fit one device call beside the tree:
#   .vllm_gpu/a: the first PART_A_BYTES of vllm.tar.xz   .vllm_gpu/b: the rest   .vllm_gpu/c: deps.tar.xz, SHA256SUMS
# (b held deps.tar.xz too until the tree grew past what the call beside it could carry, 2026-12-02).
# Each device call carries one folder; run.sh's `stash` stage keeps the parts in /tmp/parts until `vllm`
# unpacks them (all calls on the same warm machine). Takes about 6 minutes (xz -9e of about 340 MB).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
WORK=.vllm_gpu
BUILD=${BUILD:-/tmp/vllm_gpu_build}
grep -qxF "/$WORK/" .git/info/exclude 2>/dev/null || echo "/$WORK/" >> .git/info/exclude
PLAT=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for n in 2_17 2_24 2_26 2_27 2_28 2_31; do PLAT+=(--platform "manylinux_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
if [ ! -s "$BUILD/vllm.tar.xz" ]; then
  rm -rf "$BUILD/wheel" "$BUILD/vllm_tree" && mkdir -p "$BUILD/wheel" "$BUILD/vllm_tree"
  python3 -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$BUILD/wheel" vllm==0.26.0
  unzip -q "$BUILD"/wheel/vllm-0.26.0-*.whl -d "$BUILD/vllm_tree"
  # Not needed on an H100/H200 serving gpt-oss: FA2 kernels (Hopper runs FA3), the optional Rust front end,
  # deep_gemm builds for other Pythons, and the Blackwell-only fmha kernels.
  ( cd "$BUILD/vllm_tree"
    rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so
    rm -rf vllm/third_party/fmha_sm100
    # deep_gemm's CUDA headers are read only by its JIT (FP8 GEMMs, which gpt-oss does not use); the symbol tables of
    # the extensions are not needed to load them.
    rm -rf vllm/third_party/deep_gemm/include
    find vllm -name '*.so' -exec strip --strip-unneeded {} +
    find . -name __pycache__ -prune -exec rm -rf {} +
    tar -cf - vllm vllm-*.dist-info | xz -9e -T1 > "$BUILD/vllm.tar.xz" )
fi
if [ ! -s "$BUILD/deps.tar.xz" ]; then
  rm -rf "$BUILD/wheels" "$BUILD/deps_tree" && mkdir -p "$BUILD/wheels" "$BUILD/deps_tree"
  # pydantic, pydantic-core, annotated-types and typing-inspection are not here: setup.sh installs them from
  # .gpu_carry (DeepSpeed needs them too) in the call that carries part a.
  # What `vllm serve` and the openai client (serve/chat.py) import and the image lacks (found by import tests
  # against the image's package list; httpcore2, truststore and jiter by the first chat on the GPU host,
  # mistral-common (with pydantic-extra-types, pycountry, jsonschema) by the second: vLLM 0.26's harmony chat path
  # imports vllm.tokenizers.mistral; compressed-tensors (with loguru) by the first MXFP4 checkpoint served, 2026-12-01:
  # vLLM's quantization registry imports it for every quantized model).
  python3 -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$BUILD/wheels" \
    apache-tvm-ffi==0.1.15.post2 cachetools==8.0.2 cbor2==6.3.0 compressed-tensors==0.17.0 fastapi==0.136.3 loguru==0.7.3 \
    httpcore2==2.16.2 httpx2==2.16.2 jiter==0.19.0 jmespath==1.1.0 jsonschema==4.26.0 \
    jsonschema-specifications==2025.9.1 llguidance==1.7.6 mistral-common==1.13.1 model-hosting-container-standards==0.1.16 \
    msgspec==0.22.0 openai==3.57.0 openai-harmony==0.0.8 partial-json-parser==0.2.1.1.post7 \
    prometheus-fastapi-instrumentator==8.1.0 pybase64==1.5.1 pycountry==26.2.16 \
    pydantic-extra-types==2.11.1 pyzmq==27.3.0 \
    referencing==0.37.0 rpds-py==2026.9.1 \
    sniffio==1.3.1 starlette==1.10.0 truststore==0.10.5 uvicorn==0.54.0 \
    watchfiles==1.3.0 xgrammar==0.2.8
  python3 -m pip install -q --no-deps --no-index --no-compile --only-binary=:all: "${PLAT[@]}" \
    --target "$BUILD/deps_tree" "$BUILD"/wheels/*.whl
  rm -rf "$BUILD/deps_tree/bin"  # console scripts with this machine's shebang
  # Data no gpt-oss engine reads, 58 MB raw: Mistral's own tokenizer files (mistral-common is imported, never used
  # for loading a tokenizer here) and pycountry's translations (gettext catalogues).
  rm -rf "$BUILD/deps_tree/mistral_common/data" "$BUILD/deps_tree/pycountry/locales"
  ( cd "$BUILD/deps_tree" && tar -cf - . | xz -9e -T1 > "$BUILD/deps.tar.xz" )
fi
rm -rf "$WORK" && mkdir -p "$WORK/a" "$WORK/b" "$WORK/c"
LIMIT=$((64 * 1024 * 1024))
SPARE=400000  # bytes each call keeps free: files the tree gains between here and the call
TREE=$(git ls-files -z | du --files0-from=- -cb | tail -1 | cut -f1)
CARRY_BYTES=$(du -sb .gpu_carry 2>/dev/null | cut -f1) || { echo "run prepare_carry.sh first"; exit 1; }
PART_A_BYTES=${PART_A_BYTES:-$((LIMIT - TREE - CARRY_BYTES - SPARE))}
# Part a travels with .gpu_carry (the first call also installs the training wheels), part b alone; with the tree
# (about 1.3 MB) each call stays under the 64 MiB a call carries.
head -c "$PART_A_BYTES" "$BUILD/vllm.tar.xz" > "$WORK/a/vllm.tar.xz.part00"
tail -c +"$((PART_A_BYTES + 1))" "$BUILD/vllm.tar.xz" > "$WORK/b/vllm.tar.xz.part01"
cp "$BUILD/deps.tar.xz" "$WORK/c/"
(cd "$BUILD" && sha256sum vllm.tar.xz deps.tar.xz) > "$WORK/c/SHA256SUMS"
du -sb "$WORK"/*
for part in b c; do
  size=$(du -sb "$WORK/$part" | cut -f1)
  [ "$size" -lt $((LIMIT - TREE - SPARE)) ] || { echo "part $part is $size bytes: trim more"; exit 1; }
done
