"""HtFLlib's data split (``federation.split=pooled``): the dataset's train and test rows pooled,
split over the clients by label skew, each client's share cut into its own train, validation
and test rows."""

import numpy as np
import pytest

from simulations.config import ConfigError, compose
from simulations.federation import SYNTHETIC_TRAIN, _client_data

CLIENTS = (
    "federation=tiny_htfe federation.clients.0.count=4 federation.clients.1.arch=cnn4 "
    "federation.clients.1.count=4 federation.partition=dirichlet federation.alpha=0.1"
)


def shares(overrides: str) -> list:
    cfg = compose(f"{CLIENTS} {overrides}")
    return [_client_data(cfg, *cfg.client(i)) for i in range(cfg.num_clients)]


def test_pooled_shares_are_disjoint_cut_into_train_validation_and_test_with_their_label_mix():
    data = shares(
        "+federation.split=pooled +federation.validation_fraction=0.1 "
        "+federation.min_partition_size=40 federation.examples_per_client=300"
    )
    everything = np.concatenate([np.concatenate([d.train_rows, d.eval_rows]) for d in data])
    assert len(everything) == len(set(everything.tolist()))  # disjoint over all clients
    assert (everything >= SYNTHETIC_TRAIN).any()  # the test split's rows are in the pool
    for d in data:
        n = len(d.train_rows) + len(d.eval_rows) + len(d.validation_set)
        assert 40 <= n <= 300
        assert len(d.eval_rows) == round(0.25 * n) and len(d.validation_set) == round(0.1 * n)
        assert not set(d.train_rows.tolist()) & set(d.eval_rows.tolist())
    # Dirichlet 0.1: a client's own test rows mostly follow its training labels
    same = [
        np.bincount(d.train_set.labels.numpy(), minlength=4).argmax()
        == np.bincount(d.eval_set.labels.numpy(), minlength=4).argmax()
        for d in data
    ]
    assert sum(same) >= 6


def test_the_standard_split_keeps_train_and_test_apart_and_has_no_validation_rows():
    for d in shares("federation.examples_per_client=100"):
        assert (d.train_rows < SYNTHETIC_TRAIN).all() and d.validation_set is None
        assert len(d.eval_rows) == 128  # test_examples drawn from the test split


def test_pooled_with_eval_split_validation_scores_the_validation_rows():
    data = shares(
        "+federation.split=pooled +federation.validation_fraction=0.2 eval_split=validation"
    )
    assert all(d.validation_set is None and len(d.eval_rows) > 0 for d in data)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+federation.split=shuffled", "federation.split must be one of"),
        ("+federation.test_fraction=1.5", "federation.test_fraction must be in (0, 1)"),
        (
            "+federation.test_fraction=0.5 +federation.validation_fraction=0.5",
            "federation.test_fraction + federation.validation_fraction must be < 1",
        ),
        ("+federation.min_partition_size=-1", "federation.min_partition_size must be"),
    ],
)
def test_bad_split_settings_are_named(override: str, named: str):
    with pytest.raises(ConfigError) as info:
        compose(f"{CLIENTS} {override}")
    assert named in str(info.value)
