"""Where the image counts on VQA: two `medunifier eval vqa` prediction files, by answer and question type.

    medunifier eval vqa --ckpt RUN --data M --split val --open-scoring rank --top-k 32 --out A
    medunifier eval vqa --ckpt RUN --data M --split val --open-scoring rank --top-k 32 --shuffle-images --out B
    python benchmarks/vqa_shuffle_breakdown.py --data M A/predictions.jsonl B/predictions.jsonl

For each (closed / open, first listed question type): questions, correct with the images as given, correct
with shuffled images, and how many predictions the shuffle changed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def read_jsonl(path: Path) -> dict[str, dict]:
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {row["id"]: row for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("given", type=Path, help="predictions.jsonl with the images as given")
    parser.add_argument("shuffled", type=Path, help="predictions.jsonl of the same questions, images shuffled")
    parser.add_argument("--data", type=Path, required=True, help="the manifest (for each question's type)")
    args = parser.parse_args()
    records, given, shuffled = read_jsonl(args.data), read_jsonl(args.given), read_jsonl(args.shuffled)
    if set(given) != set(shuffled):
        parser.error("the two prediction files answer different questions")
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for qid, a in given.items():
        b = shuffled[qid]
        kind = ("closed" if a["closed"] else "open", str(records[qid].get("question_type") or "?").split(",")[0])
        for total in (rows[kind], rows[(kind[0], "all")]):
            total[0] += 1
            total[1] += bool(a["correct"])
            total[2] += bool(b["correct"])
            total[3] += a["prediction"] != b["prediction"]
    print(f"{'answer':7} {'type':9} {'n':>4} {'given':>6} {'shuffled':>8} {'changed':>7}")
    for (answer, qtype), (n, right, right_shuffled, changed) in sorted(rows.items()):
        print(f"{answer:7} {qtype:9} {n:4d} {right:6d} {right_shuffled:8d} {changed:7d}")


if __name__ == "__main__":
    main()
