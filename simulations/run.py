"""Run a federation from the Hydra config with Flower's simulation engine.

    python -m simulations.run                                  # the default federation
    python -m simulations.run strategy=local num_rounds=5      # a baseline
    python -m simulations.run -m adapter=lpka,avg,rows,mlp seed=0,1,2   # a sweep

Each run writes ``metrics.jsonl``, ``summary.md`` and plots into its Hydra output folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import hydra
import torch
from flwr.simulation import run_simulation
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mergenet_fl.flower.base import NotEnoughNodes
from simulations.client_app import FixedConfig, make_client_app
from simulations.config import ConfigError, ExperimentConfig, from_dictconfig
from simulations.preflight import preflight
from simulations.server_app import RunFailed, make_server_app, setup_logging

log = logging.getLogger("simulations.run")

# Every message carries its node's context, the client's model in it, to a Ray actor and back.
# Ray moves objects above 100 KB through its object store: 8-11 ms a round trip with one
# core busy, against 1.5-5 ms inline up to 1 MB (slower inline from about 2 MB; performance.md).
RAY_INLINE_BYTES = 1 << 20


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    hydra_dir = Path(HydraConfig.get().runtime.output_dir).expanduser().resolve()
    try:
        exp = from_dictconfig(cfg)
        preflight(exp)
        check_resources(exp)
    except ConfigError as exc:
        if not cfg.get("resume"):  # Hydra made the run's folder already: nothing ran in it
            shutil.rmtree(hydra_dir, ignore_errors=True)
        log.error("%s", exc)
        raise SystemExit(2) from None
    run_dir = Path(exp.resume).expanduser().resolve() if exp.resume else hydra_dir
    try:
        simulate(exp, run_dir)
    except (RunFailed, NotEnoughNodes) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    log.info("results in %s", run_dir)


def simulate(exp: ExperimentConfig, run_dir: Path) -> dict:
    """Run ``exp`` on Flower's simulation engine into ``run_dir``; return its ``run.json``."""
    run_simulation(
        server_app=make_server_app(lambda context: (exp, run_dir)),
        client_app=make_client_app(FixedConfig(exp)),
        num_supernodes=exp.num_clients,
        backend_config=backend_config(exp),
    )
    run_file = run_dir / "run.json"
    if not run_file.exists():
        log.error("the simulation ended without results in %s; see the log above", run_dir)
        raise SystemExit(1)
    return json.loads(run_file.read_text(encoding="utf-8"))


def backend_config(exp: ExperimentConfig) -> dict:
    """Flower's Ray backend for ``exp``: its clients' resources, and contexts (messages, return
    values) of up to ``RAY_INLINE_BYTES`` sent with the call rather than through Ray's object
    store."""
    return {
        "client_resources": {"num_cpus": exp.client_cpus, "num_gpus": exp.client_gpus},
        "init_args": {"_system_config": {"max_direct_call_object_size": RAY_INLINE_BYTES}},
    }


def check_resources(exp: ExperimentConfig) -> None:
    """Refuse resource requests that would make the simulation wait for ever."""
    cpus = os.cpu_count() or 1
    if exp.client_cpus > cpus:
        raise ConfigError(
            f"client_cpus={exp.client_cpus:g} exceeds this machine's {cpus} CPUs (the run would "
            "hang)"
        )
    gpus = torch.cuda.device_count()
    if exp.client_gpus > gpus:
        raise ConfigError(f"client_gpus={exp.client_gpus:g}, but this machine has {gpus} GPUs")


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    main()
