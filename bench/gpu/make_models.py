"""Models a GPU host needs but cannot download (it has no network), built from the carried tokenizer.

    python -m bench.gpu.make_models tiny --tokenizer .gpu_carry/tokenizer     # demo:tiny-gpt-oss for the tests
    python -m bench.gpu.make_models 20b --tokenizer .gpu_carry/tokenizer --out /tmp/gpt-oss-20b-random
    python -m bench.gpu.make_models 120b --tokenizer .gpu_carry/tokenizer --out /tmp/gpt-oss-120b-random
    python -m bench.gpu.make_models 20b-bf16 --tokenizer .gpu_carry/tokenizer --out /tmp/gpt-oss-20b-unquantized

`tiny` writes $GPTOSS_WORKSPACE/models/tiny-gpt-oss the way gptoss_webui.demo does (same config, seed and
sinks), except that the tokenizer is copied instead of rebuilt: rebuilding needs the o200k ranks and
openai-harmony, which the GPU image lacks. Its BUILD.json makes ensure_demo_model accept the folder.
`20b` and `120b` save the architecture with random weights in the released layout (MXFP4 experts,
quantization_config; 12.8 and about 61 GiB) for the end-to-end runs. `20b-bf16` saves the 20b all in bf16 with no
quantization_config (about 39 GiB): the unquantized checkpoint that Unsloth's bitsandbytes 4-bit loading needs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from bench.model import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TOKENIZER_FILES,
    build_random_model,
    gpt_oss_20b_config,
    gpt_oss_120b_config,
    save_random_checkpoint,
)


def make_tiny(tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from gptoss_webui.demo import BUILD_VERSION, DEMO_MODELS, _manifest, _model_config
    from gptoss_webui.paths import workspace_dir

    folder = workspace_dir() / "models" / "tiny-gpt-oss"
    folder.mkdir(parents=True, exist_ok=True)
    specials = {"<|startoftext|>": BOS_ID, "<|return|>": EOS_ID, "<|endoftext|>": PAD_ID}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_model_config(DEMO_MODELS["tiny-gpt-oss"], specials),
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".sinks"):
                param.normal_(0.0, 1.0)  # as demo.build_model: sinks large enough to matter
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, folder / name)
    (folder / "BUILD.json").write_text(json.dumps({"version": BUILD_VERSION, "files": _manifest(folder)}, indent=1))
    return folder


def save_bf16_checkpoint(out_dir: Path, tokenizer_dir: Path) -> Path:
    model = build_random_model(gpt_oss_20b_config(), "eager", "cuda")  # transformers' own init, all bf16
    model.config.use_cache = True  # as released (build_random_model turns it off for training)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["tiny", "20b", "120b", "20b-bf16"])
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with " + ", ".join(TOKENIZER_FILES))
    parser.add_argument("--out", type=Path, help="20b: checkpoint folder")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.what == "tiny":
        path = make_tiny(args.tokenizer)
    elif args.what == "20b-bf16":
        if args.out is None:
            parser.error("20b-bf16 needs --out")
        path = save_bf16_checkpoint(args.out, args.tokenizer)
    else:
        if args.out is None:
            parser.error(f"{args.what} needs --out")
        config = gpt_oss_20b_config() if args.what == "20b" else gpt_oss_120b_config()
        path = save_random_checkpoint(args.out, args.tokenizer, config)
    size = sum(p.stat().st_size for p in Path(path).iterdir()) / 2**30
    print(f"{args.what}: {path} ({size:.2f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
