"""Run a study (several Hydra multiruns of ``simulations.run``), then write its report.

    python -m simulations.study quick     # 2 seeds, 3 rounds: under 10 minutes on 2 cores
    python -m simulations.study full      # 3 seeds, every method: under an hour on 2 cores
    python -m simulations.study benchmark # the field's baselines, HtFLlib's protocol: 90 min
    python -m simulations.study robustness  # attackers and defences: docs/robustness.md

The sweeps are in ``conf/study/<name>.yaml``; results go to ``outputs/study-<name>/`` and the
report to ``docs/results.md`` for ``full``, ``docs/benchmark.md`` for ``benchmark``,
``docs/robustness.md`` for ``robustness`` (its own report: :mod:`simulations.robustness`),
``docs/results-<name>.md`` for the others (``--report`` to change it).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from simulations import report, robustness
from simulations.config import CONF_DIR
from simulations.server_app import setup_logging

log = logging.getLogger("simulations.study")
REPORTS = {  # the others: docs/results-<name>.md
    "full": "docs/results.md",
    "benchmark": "docs/benchmark.md",
    "robustness": "docs/robustness.md",
}
WRITERS = {"robustness": robustness.write_report}  # the others: simulations.report's


def sweep_commands(study: str, out: Path) -> dict[str, list[str]]:
    """Sweep name -> the ``simulations.run`` multirun command that runs it. A sweep that names
    its own seeds (``seed=0,1,2``) runs those instead of the study's."""
    spec = OmegaConf.load(CONF_DIR / "study" / f"{study}.yaml")
    seeds = ",".join(str(s) for s in spec.seeds)
    commands = {}
    for name, overrides in spec.sweeps.items():
        own_seeds = any(str(o).startswith("seed=") for o in overrides)
        commands[name] = [
            sys.executable,
            "-m",
            "simulations.run",
            "-m",
            *overrides,
            *spec.common,
            *([] if own_seeds else [f"seed={seeds}"]),
            f"output_dir={out}",
            f"hydra.sweep.dir={out}/{name}",
            "hydra.sweep.subdir=${hydra.job.num}-${name}-seed${seed}",
        ]
    return commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a file of conf/study/, e.g. quick or full")
    parser.add_argument("--out", type=Path, help="default: outputs/study-<study>")
    parser.add_argument(
        "--report", type=Path, help="default: docs/results.md (full), docs/results-<study>.md"
    )
    parser.add_argument("--report-only", action="store_true", help="write the report, run nothing")
    parser.add_argument(
        "--sweeps", help="comma-separated sweeps to (re)run, e.g. mergenet,cycle (default: all)"
    )
    args = parser.parse_args()
    setup_logging()
    out = (args.out or Path("outputs") / f"study-{args.study}").resolve()
    dest = args.report or Path(REPORTS.get(args.study, f"docs/results-{args.study}.md"))
    if not args.report_only:
        commands = sweep_commands(args.study, out)
        if args.sweeps:
            chosen = args.sweeps.split(",")
            unknown = sorted(set(chosen) - set(commands))
            if unknown:
                parser.error(f"unknown sweeps {unknown}; {args.study!r} has {sorted(commands)}")
            commands = {name: cmd for name, cmd in commands.items() if name in chosen}
        start = time.perf_counter()
        for i, (name, cmd) in enumerate(commands.items(), 1):
            log.info(
                "[%d/%d] sweep %r (%.0f s so far)",
                i,
                len(commands),
                name,
                time.perf_counter() - start,
            )
            if (out / name).exists():
                log.info("replacing the earlier results of sweep %r", name)
                shutil.rmtree(out / name)
            subprocess.run(cmd, check=True)
        log.info("study %r done in %.0f s", args.study, time.perf_counter() - start)
    # the command that runs the whole study, however this report was produced
    command = f"python -m simulations.study {args.study}"
    write = WRITERS.get(args.study, report.write_report)
    write(out, dest, title=f"Results: study `{args.study}`", command=command)
    log.info("report written to %s", dest)


if __name__ == "__main__":
    main()
