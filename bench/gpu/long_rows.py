"""Harmony `messages` rows of a chosen token length, for runs that must fill their max_length (the demo set's rows
are 75-106 tokens). Each assistant answer is a stream of common English words, one o200k token each.

    python -m bench.gpu.long_rows --tokens 4096 --rows 64 --out /tmp/long4096.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ("the", "sea", "ship", "wind", "sail", "captain", "crew", "island", "gold", "map", "storm", "wave",
         "night", "star", "moon", "port", "harbor", "rope", "deck", "anchor", "course", "north", "south", "east",
         "west", "coast", "rock", "reef", "treasure", "chest", "flag", "mast", "cannon", "voyage")


def rows(tokens: int, count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": f"Tell me sea story number {i}."},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(tokens))}]}
            for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows(args.tokens, args.rows)), encoding="utf-8")


if __name__ == "__main__":
    main()
