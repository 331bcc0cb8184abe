"""A run's folder: where it goes, and whether the run in it ended normally.

    python -m simulations.results check <run dir>     # exit 1 if the run failed

What a run writes into its folder is :mod:`mergenet_fl.flower.runlog`'s.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def new_run_dir(root: str | os.PathLike, name: str) -> Path:
    """A fresh ``root/<timestamp>-<name>`` folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root).expanduser().resolve() / f"{stamp}-{name}"
    suffix = 1
    while path.exists():
        path = path.with_name(f"{stamp}-{name}-{suffix}")
        suffix += 1
    path.mkdir(parents=True)
    return path


def check(run_dir: Path) -> int:
    """0 if the run in ``run_dir`` ended normally, else 1 (with the reason on stderr)."""
    run_file = run_dir / "run.json"
    if not run_file.exists():
        print(f"{run_dir}: no run.json, the run did not finish", file=sys.stderr)
        return 1
    run = json.loads(run_file.read_text(encoding="utf-8"))
    if run.get("status") == "failed":
        print(f"{run_dir}: the run failed: {run.get('failed')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "check":
        sys.exit("usage: python -m simulations.results check <run dir>")
    sys.exit(check(Path(sys.argv[2])))
