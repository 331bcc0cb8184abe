"""The ServerApp: compose the config, build the strategy, run it, write the results."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from mergenet_fl.flower.base import NotEnoughNodes
from mergenet_fl.flower.checkpoint import Checkpointer, load_checkpoint
from mergenet_fl.flower.protocol import CLIENT_STATE_DIR
from mergenet_fl.flower.runlog import RunLog, read_lines, summarize
from simulations.config import ExperimentConfig, compose
from simulations.preflight import preflight
from simulations.results import new_run_dir

log = logging.getLogger(__name__)


def setup_logging() -> None:
    """Show this project's INFO logs next to Flower's (the app processes configure nothing)."""
    for name in ("mergenet_fl", "simulations"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def run_server(grid: Grid, cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Run the federation described by ``cfg``; results go to ``run_dir``.

    With ``cfg.checkpoint`` the server state is saved to ``run_dir/server.ckpt`` after every
    round and clients keep their models under ``run_dir/clients``; with ``cfg.resume``
    (``run_dir`` is then that run's folder) the run continues after its last checkpoint.
    """
    if not cfg.resume:  # a fresh run in a folder that holds an earlier one replaces it
        for stale in ("run.json", "server.ckpt"):  # metrics.jsonl: RunLog starts it afresh
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "clients", ignore_errors=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg.raw), encoding="utf-8")
    # summarized below, with the whole run's time; a resumed run keeps its lines
    recorder = RunLog(run_dir, summary=False, append=bool(cfg.resume))
    strategy = cfg.build_strategy(on_round=recorder)
    train_config = {"local-epochs": cfg.local_epochs}
    done = 0
    if cfg.checkpoint or cfg.resume:
        checkpoint = run_dir / "server.ckpt"
        if cfg.resume:
            state = load_checkpoint(checkpoint)
            strategy.resume(state)
            done = state["round"]
            recorder.drop_after(done)  # lines of the interrupted round go
        strategy.on_round_end = Checkpointer(checkpoint)
        train_config[CLIENT_STATE_DIR] = str(run_dir / "clients")
    log.info(
        "run %r: %d clients, rounds %d-%d, results in %s",
        cfg.name,
        cfg.num_clients,
        done + 1,
        cfg.num_rounds,
        run_dir,
    )
    start = time.perf_counter()
    if done < cfg.num_rounds:
        try:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(),
                num_rounds=cfg.num_rounds - done,
                timeout=cfg.round_timeout,
                train_config=ConfigRecord(train_config),
            )
        except NotEnoughNodes as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise NotEnoughNodes(
                f"{exc}. A local simulation needs one SuperNode per client: "
                f"flwr run . --federation-config 'num-supernodes={cfg.num_clients}' "
                f"(or bash scripts/quickstart.sh, which passes it); a deployment needs "
                f"{cfg.num_clients} flower-supernode processes"
            ) from None
    seconds = time.perf_counter() - start
    run_file = run_dir / "run.json"
    previous = json.loads(run_file.read_text()) if run_file.exists() else {}
    total = previous.get("seconds", 0.0) + seconds  # a resumed run adds to its first part
    failed = failed_clients(read_lines(run_dir), [c.group for c in cfg.clients])
    status = "failed" if failed and not cfg.allow_failed_clients else "ok"
    run_file.write_text(
        json.dumps(
            {"name": cfg.name, "seconds": round(total, 3), "status": status, "failed": failed}
        ),
        encoding="utf-8",
    )
    groups = list(dict.fromkeys(c.group for c in cfg.clients))
    summary = summarize(run_dir, cfg.name, total, groups)
    log.info("results written to %s\n%s", run_dir, summary.read_text(encoding="utf-8"))
    if status == "failed":
        raise RunFailed(
            "clients failed in every round they were asked: "
            + "; ".join(f"{who}: {why}" for who, why in failed.items())
            + " (allow_failed_clients=true lets such a run end normally)"
        )
    return run_dir


class RunFailed(RuntimeError):
    """Some client or group never trained; the run's results leave them out."""


def failed_clients(lines: list[dict], groups: list[str]) -> dict[str, str]:
    """Clients that never trained successfully, and groups with no such client: their reason."""
    trained = [
        line
        for line in lines
        if line.get("stage") == "train" and "group" in line and "dropped" not in line
    ]
    trained_clients = {line["client"] for line in trained}
    trained_groups = {line["group"] for line in trained}
    failed: dict[str, str] = {}
    for line in lines:
        if "dropped" in line and line["client"] not in trained_clients:
            failed[line["client"]] = line["dropped"]
    for group in groups:
        if group not in trained_groups:
            failed.setdefault(f"group {group}", "no client of this group trained")
    return failed


def make_server_app(config_for: Callable[[Context], tuple[ExperimentConfig, Path]]) -> ServerApp:
    """A ServerApp whose config (and run folder) come from ``config_for(context)``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_logging()
        cfg, run_dir = config_for(context)
        run_server(grid, cfg, run_dir)

    return app


def _from_run_config(context: Context) -> tuple[ExperimentConfig, Path]:
    cfg = compose(str(context.run_config.get("overrides", "")))
    preflight(cfg)  # before any folder or round: every problem at once
    if cfg.resume:
        return cfg, Path(cfg.resume).expanduser().resolve()
    root = str(context.run_config.get("output-dir", "")) or cfg.output_dir
    return cfg, new_run_dir(root, cfg.name)


app = make_server_app(_from_run_config)
