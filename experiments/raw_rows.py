"""An experiment's raw rows: the JSON file ``{"rows": [...]}`` a script extends one measured row at a time.

Every experiment script reads its --out file first and skips the rows already there, so a run stopped half way
resumes where it stopped; the file is rewritten atomically after each row, so an interrupted write loses nothing.

    rows = RawRows(args.out, key=lambda r: (r["config"], r["seed"]))
    if (name, seed) not in rows:
        rows.add({"config": name, "seed": seed, "miou": m}, f"{name} seed {seed}: mIoU {100 * m:.1f}")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path


class RawRows:
    def __init__(self, path: str | os.PathLike, key: Callable[[dict], Hashable],
                 sort: Callable[[dict], object] | None = None):
        """``key(row)`` names what a row measured (a resumed run skips those keys); ``sort``: the file's row order
        (default: the order they were measured in)."""
        self.path, self.key, self.sort = Path(path), key, sort
        self.rows: list[dict] = json.loads(self.path.read_text())["rows"] if self.path.is_file() else []

    def __contains__(self, key: Hashable) -> bool:
        return any(self.key(r) == key for r in self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: dict, line: str | None = None) -> dict:
        """Append ``row``, print ``line`` (the row's one-line summary) and rewrite the file."""
        self.rows.append(row)
        if line is not None:
            print(line, flush=True)
        self.write()
        return row

    def write(self) -> None:
        rows = sorted(self.rows, key=self.sort) if self.sort else self.rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"rows": rows}, indent=1))
        os.replace(tmp, self.path)
