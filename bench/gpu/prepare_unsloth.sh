#!/usr/bin/env bash
# Run HERE (the CPU machine, with network), once: fill .unsloth_carry/ with Unsloth and what it needs that the GPU
# image lacks, for `bash bench/gpu/throughput.sh unsloth` (carry .gpu_carry .unsloth_carry).
# .unsloth_carry/ is in .gitignore, so it travels only when a device call names it in `carry`.
#
# unsloth 2026.10.9 and unsloth_zoo 2026.10.9 are the newest releases; they accept the image's torch 2.11 (< 2.15),
# transformers 5.17.0 (<= 5.17.0) and peft 0.21.2. Installed with --no-deps, `import unsloth` and the gpt-oss load
# path need only these besides the image's packages (tried on the CPU with UNSLOTH_ALLOW_CPU=1): trl <= 1.15.0,
# datasets < 5 (and its dill, multiprocess). bitsandbytes is optional (4-bit on an unquantized checkpoint).
# Two wheels are cut down, with their RECORD rewritten: unsloth without studio/ and unsloth_cli/ (82 MB of web
# app, not imported by the library), bitsandbytes with only the CUDA 13.0 library (torch 2.11.0+cu130).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
CARRY=.unsloth_carry
PY=${PYTHON:-.venv/bin/python}
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT
rm -rf "$CARRY" && mkdir -p "$CARRY"

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$RAW" \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 \
  bitsandbytes==0.50.2

"$PY" - "$RAW" "$CARRY" <<'EOF'
"""Copy the wheels, dropping unused members from two of them (RECORD rewritten so pip accepts the result)."""
import base64, hashlib, re, shutil, sys, zipfile
from pathlib import Path

raw, carry = Path(sys.argv[1]), Path(sys.argv[2])
DROP = {
    "unsloth-": lambda n: n.startswith(("studio/", "unsloth_cli/")) or n.endswith("dist-info/entry_points.txt"),
    "bitsandbytes-": lambda n: re.search(r"libbitsandbytes_(?!cuda130\.so$|cpu\.so$)[^/]*\.so$", n) is not None,
}

def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"

for wheel in sorted(raw.glob("*.whl")):
    drop = next((f for prefix, f in DROP.items() if wheel.name.startswith(prefix)), None)
    if drop is None:
        shutil.copy(wheel, carry / wheel.name)
        continue
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(carry / wheel.name, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept, lines = [n for n in src.namelist() if not drop(n) and n != record], []
        for name in kept:
            data = src.read(name)
            if name.endswith(".dist-info/top_level.txt"):
                data = b"".join(line for line in data.splitlines(True) if line.strip() not in (b"studio", b"unsloth_cli"))
            dst.writestr(src.getinfo(name), data)
            lines.append(record_line(name, data))
        dst.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB -> {(carry / wheel.name).stat().st_size / 2**20:.1f} MiB")
EOF

ls -l "$CARRY"
# What a call carries: the tracked and untracked-not-ignored files, plus the carried folders; 64 MiB at most.
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s -- 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
gpu=$(du -sbL "${GPU_CARRY:-.gpu_carry}" 2>/dev/null | cut -f1 || echo 0)  # GPU_CARRY: where it lies, if not here
uns=$(du -sb "$CARRY" | cut -f1)
awk -v t="$tree" -v g="${gpu:-0}" -v u="$uns" 'BEGIN {
  m = 2^20; total = t + g + u
  printf "tree %.1f MiB + .gpu_carry %.1f MiB + %s %.1f MiB = %.1f MiB of 64 MiB: %.1f MiB left\n",
         t / m, g / m, ".unsloth_carry", u / m, total / m, 64 - total / m
  if (total > 64 * m) exit 1 }'
