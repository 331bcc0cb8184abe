"""The ServerApp: compose the config, build the strategy, run it, write the results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from simulations.config import ExperimentConfig, compose
from simulations.results import RunRecorder, new_run_dir, summarize

log = logging.getLogger(__name__)


def setup_logging() -> None:
    """Show this project's INFO logs next to Flower's (the app processes configure nothing)."""
    for name in ("mergenet_fl", "strategies", "simulations"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def run_server(grid: Grid, cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Run the federation described by ``cfg``; results go to ``run_dir``."""
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg.raw), encoding="utf-8")
    strategy = cfg.build_strategy(on_round=RunRecorder(run_dir))
    log.info(
        "run %r: %d clients, %d rounds, results in %s",
        cfg.name,
        cfg.num_clients,
        cfg.num_rounds,
        run_dir,
    )
    start = time.perf_counter()
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({"local-epochs": cfg.local_epochs}),
    )
    summary = summarize(run_dir, cfg.name, time.perf_counter() - start)
    log.info("results written to %s\n%s", run_dir, summary.read_text(encoding="utf-8"))
    return run_dir


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
    root = str(context.run_config.get("output-dir", "")) or cfg.output_dir
    return cfg, new_run_dir(root, cfg.name)


app = make_server_app(_from_run_config)
