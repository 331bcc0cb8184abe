"""Every study's sweeps compose, as Hydra's multirun composes them (the swept groups at their
defaults, the other overrides applied) and job by job (each combination of swept values, checked
into an ExperimentConfig), so that a study never stops at its fifth sweep on a config error."""

import itertools
import shlex

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from simulations.config import CONF_DIR, compose
from simulations.study import sweep_commands

STUDIES = sorted(p.stem for p in (CONF_DIR / "study").glob("*.yaml"))


def sweeps(study: str) -> list[list[str]]:
    """Each sweep's overrides (seeds, output folders and Hydra's own keys left out)."""
    spec = OmegaConf.load(CONF_DIR / "study" / f"{study}.yaml")
    return [[*overrides, *spec.common] for overrides in spec.sweeps.values()]


def jobs(overrides: list[str]) -> list[list[str]]:
    """Every combination of the swept values (``key=a,b``, parsed as Hydra parses them: a
    value may be a dict or list with commas of its own) with the other overrides."""
    parser = OverridesParser.create()
    options = []
    for override in overrides:
        parsed = parser.parse_override(override)
        if parsed.is_sweep_override():
            key = parsed.get_key_element()
            options.append([f"{key}={v}" for v in parsed.sweep_string_iterator()])
        else:
            options.append([override])
    return [list(job) for job in itertools.product(*options)]


@pytest.mark.parametrize("study", STUDIES)
def test_every_sweep_of_the_study_composes_as_a_multirun_and_job_by_job(study):
    assert sweep_commands(study, CONF_DIR)  # the commands the study runs
    for overrides in sweeps(study):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            GlobalHydra.instance().hydra.compose_config(  # what `simulations.run -m` does first
                "config", overrides, run_mode=RunMode.MULTIRUN, with_log_configuration=False
            )
        for job in jobs(overrides):
            compose(shlex.join(job))  # raises ConfigError naming every problem


def test_a_swept_group_with_an_override_of_a_key_only_it_has_is_caught():
    bad = ["federation=htfe4", "strategy=fml,fedkd", "strategy.kl=mean"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        with pytest.raises(Exception, match="strategy.kl"):
            GlobalHydra.instance().hydra.compose_config(
                "config", bad, run_mode=RunMode.MULTIRUN, with_log_configuration=False
            )


def test_each_sweep_runs_its_own_seeds_or_else_the_studys():
    for study in STUDIES:
        for name, command in sweep_commands(study, CONF_DIR).items():
            seeds = [arg for arg in command if arg.startswith("seed=")]
            assert len(seeds) == 1, (study, name, seeds)
    seeds = {
        name: next(arg for arg in command if arg.startswith("seed="))
        for name, command in sweep_commands("benchmark", CONF_DIR).items()
    }
    assert seeds["images"] == "seed=0,1,2,3,4"  # the study's
    assert seeds["text"] == "seed=0,1,2"  # the sweep's own
