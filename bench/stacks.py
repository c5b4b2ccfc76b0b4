"""Sums up the stack samples of bench/gpu/stacks/sitecustomize.py (bench.serve --sample-stacks): per process, the
frames found in the most samples (inclusive: a frame counts once a sample, wherever in the stack), and a timeline of
the innermost frames, a line per --bucket-s; with --match TEXT, the time in samples whose stack holds TEXT.

    python -m bench.stacks DIR [--since UNIX_TIME] [--until UNIX_TIME] [--top 25] [--bucket-s 2] [--match TEXT ...]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def read_samples(path: Path, since: float, until: float) -> list[tuple[float, list[str]]]:
    samples = []
    for line in path.read_text(errors="replace").splitlines():
        stamp, _, stack = line.partition("\t")
        try:
            t = float(stamp)
        except ValueError:
            continue
        if since <= t <= until:
            samples.append((t, stack.split(" < ")))
    return samples


def summary(samples: list[tuple[float, list[str]]], top: int, bucket_s: float, match: list[str]) -> list[str]:
    """Seconds per frame from the samples' own spacing (a busy process takes fewer than asked)."""
    every_s = (samples[-1][0] - samples[0][0]) / max(1, len(samples) - 1)
    inclusive: Counter[str] = Counter()
    for _, frames in samples:
        inclusive.update({f.rsplit(":", 1)[0] for f in frames})  # function, any line
    lines = [f"{n * every_s:7.1f} s  {frame}" for frame, n in inclusive.most_common(top)]
    for text in match:
        n = sum(any(text in f for f in frames) for _, frames in samples)
        lines.append(f"{n * every_s:7.1f} s  in samples holding {text!r}")
    lines.append("timeline (bucket start, samples, the innermost 3 frames seen most):")
    t0 = samples[0][0]
    buckets: dict[int, Counter[str]] = {}
    for t, frames in samples:
        buckets.setdefault(int((t - t0) // bucket_s), Counter())[" < ".join(frames[:3])] += 1
    for b, seen in sorted(buckets.items()):
        frames, n = seen.most_common(1)[0]
        lines.append(f"  +{b * bucket_s:6.1f} s  {sum(seen.values()):3d}  {frames}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--since", type=float, default=0.0)
    parser.add_argument("--until", type=float, default=float("inf"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--bucket-s", type=float, default=2.0)
    parser.add_argument("--match", action="append", default=[], help="a frame's text, e.g. compiler.py:compile")
    args = parser.parse_args(argv)
    for path in sorted(args.folder.glob("stacks-*.txt")):
        samples = read_samples(path, args.since, args.until)
        if not samples:
            continue
        span = samples[-1][0] - samples[0][0]
        print(f"== {path.name}: {len(samples)} samples over {span:.1f} s")
        print("\n".join(summary(samples, args.top, args.bucket_s, args.match)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
