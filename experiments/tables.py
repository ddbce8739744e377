"""Markdown tables of the readout experiments' raw rows (docs/segmentation/*.json), as pasted in BENCHMARKS.md.

    python experiments/tables.py docs/segmentation/levers_dev.json     # one row per config: mean ± std over seeds
    python experiments/tables.py docs/segmentation/levers_test.json --per-class
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _ms(values: list[float]) -> str:
    values = [100 * v for v in values]
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--per-class", action="store_true")
    args = ap.parse_args()
    rows = json.loads(args.file.read_text())["rows"]
    key = "config" if "config" in rows[0] else "steps" if "steps" in rows[0] else "step"
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key] if key != "steps" else (r["steps"], r["max_shift"]), []).append(r)
    first = groups[next(iter(groups))][0]
    classes = list(first.get("per_class_iou", {})) if args.per_class else []
    print(f"| {key} | seeds | mIoU | pixel accuracy |" + "".join(f" {c} |" for c in classes))
    print("|---" * (4 + len(classes)) + "|")
    for name, group in groups.items():
        cells = [_ms([g["per_class_iou"][c] for g in group]) for c in classes]
        print(f"| {name} | {len(group)} | {_ms([g['miou'] for g in group])} | "
              f"{_ms([g['pixel_accuracy'] for g in group])} |" + "".join(f" {c} |" for c in cells))


if __name__ == "__main__":
    main()
