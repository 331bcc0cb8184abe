"""Run a federation from the Hydra config with Flower's simulation engine.

    python -m simulations.run                                  # the default federation
    python -m simulations.run strategy=local num_rounds=5      # a baseline
    python -m simulations.run -m adapter=lpka,avg,rows,mlp seed=0,1,2   # a sweep

Each run writes ``metrics.jsonl``, ``summary.md`` and plots into its Hydra output folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from flwr.simulation import run_simulation
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from simulations.client_app import make_client_app
from simulations.config import from_dictconfig
from simulations.server_app import make_server_app, setup_logging

log = logging.getLogger("simulations.run")


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    exp = from_dictconfig(cfg)
    run_dir = Path(exp.resume or HydraConfig.get().runtime.output_dir).expanduser().resolve()
    cpus = os.cpu_count() or 1
    if exp.client_cpus > cpus:
        raise ValueError(
            f"client_cpus={exp.client_cpus} exceeds this machine's {cpus} CPUs (the run would hang)"
        )
    run_simulation(
        server_app=make_server_app(lambda context: (exp, run_dir)),
        client_app=make_client_app(lambda context: exp),
        num_supernodes=exp.num_clients,
        backend_config={"client_resources": {"num_cpus": exp.client_cpus, "num_gpus": 0.0}},
    )
    if not (run_dir / "summary.md").exists():
        raise RuntimeError(f"the simulation ended without results in {run_dir}; see the log above")
    log.info("results in %s", run_dir)


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    main()
