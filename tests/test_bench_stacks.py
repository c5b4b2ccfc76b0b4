"""The warm-start diagnostics of bench/serve.py: the stack sampler the engine's processes load (forked children
included), bench.stacks' summary of it, and cache_writes, which says what a start wrote into the compile caches."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench.serve import cache_writes
from bench.stacks import main as stacks_main
from bench.stacks import read_samples

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = textwrap.dedent("""
    import os, time

    def busy_child():
        time.sleep(0.6)

    def busy_parent():
        pid = os.fork()
        if pid == 0:
            busy_child()
            os._exit(0)
        time.sleep(0.6)
        os.waitpid(pid, 0)

    busy_parent()
""")


def test_the_sampler_follows_a_forked_child(tmp_path, capsys):
    env = dict(os.environ, GPTOSS_STACKS_DIR=str(tmp_path), GPTOSS_STACKS_EVERY_S="0.05",
               PYTHONPATH=str(ROOT / "bench" / "gpu" / "stacks"))
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # DeepSpeed and vLLM children may parse stdout: the sampler writes files only
    files = sorted(tmp_path.glob("stacks-*.txt"))
    assert len(files) == 2
    innermost = {path.name: {frames[0] for _, frames in read_samples(path, 0, float("inf"))} for path in files}
    seen = " ".join(" ".join(frames) for frames in innermost.values())
    assert "busy_parent" in seen and "busy_child" in seen
    assert stacks_main([str(tmp_path), "--match", "busy_child"]) == 0
    out = capsys.readouterr().out
    assert out.count("== stacks-") == 2 and "<string>:busy_child" in out and "timeline" in out
    child_s = [float(line.split()[0]) for line in out.splitlines() if line.endswith("holding 'busy_child'")]
    assert len(child_s) == 2 and min(child_s) == 0.0 and 0.3 < max(child_s) < 1.0  # the child slept 0.6 s


def test_cache_writes_counts_only_what_a_start_wrote(tmp_path, monkeypatch):
    vllm_root, triton_root = tmp_path / "vllm", tmp_path / "triton"
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(vllm_root))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(triton_root))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # Inductor's default cache lives there
    old = vllm_root / "torch_compile_cache" / "abc" / "rank_0_0" / "backbone" / "old.py"
    old.parent.mkdir(parents=True)
    old.write_text("x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    since = time.time() - 1
    for name in ("k1.cubin", "k2.cubin"):
        kernel = triton_root / "HASH1" / name
        kernel.parent.mkdir(parents=True, exist_ok=True)
        kernel.write_bytes(b"\0" * 2**19)
    (vllm_root / "startup_plan").mkdir()
    (vllm_root / "startup_plan" / "plan.json").write_text("{}")
    written = cache_writes(since)
    assert written == {str(triton_root / "HASH1"): [2, 1.0], str(vllm_root / "startup_plan"): [1, 0.0], "all": [3, 1.0]}
    assert cache_writes(since, top=1) == {str(triton_root / "HASH1"): [2, 1.0], "all": [3, 1.0]}
