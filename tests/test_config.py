import numpy as np
import pytest
import torch

from harness import needs_real_data
from mergenet_fl.flower import FML, FedKD, FedProto, GroupFedAvg, LGFedAvg, LocalOnly, MergeNet
from simulations import data
from simulations.config import ConfigError, compose
from simulations.federation import build_workload
from simulations.tasks import get_task


def test_string_and_list_overrides_compose_the_same_config():
    a = compose("strategy=mergenet adapter=mlp num_rounds=5")
    b = compose(["strategy=mergenet", "adapter=mlp", "num_rounds=5"])
    assert a == b and a.raw == b.raw
    assert a.adapter["variant"] == "mlp" and a.num_rounds == 5
    assert a.name == "mergenet-mlp-T1-share-all"
    hn = a.hypernet()
    assert hn.adapter.variant == "mlp" and hn.adapter.rank == a.rank


def test_group_targets_follow_share_unless_set():
    assert compose("strategy=mergenet").hypernet().group_targets
    assert not compose("strategy=mergenet strategy.share=none").hypernet().group_targets
    explicit = compose("strategy=mergenet strategy.share=none strategy.group_targets=true")
    assert explicit.hypernet().group_targets


def test_default_federation_is_heterogeneous_and_fits_flowers_local_simulation():
    cfg = compose()
    assert cfg.num_clients == 2  # plain `flwr run .` simulates 2 SuperNodes
    assert len({c.arch for c in cfg.clients}) == 2
    assert {c.task for c in cfg.clients} >= {"image_classification", "text_classification"}


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        compose(
            "num_rounds=0 strategy.share=some adapter.heads=3 federation.alpha=-1 "
            "strategy.group_targets=sometimes eval_split=train"
        )
    message = str(info.value)
    for part in (
        "num_rounds must be an integer >= 1",
        "strategy.share",
        "divisible by heads=3",
        "federation.alpha must be > 0",
        "strategy.group_targets must be true, false or null, got 'sometimes'",
        "eval_split must be one of ('test', 'local', 'validation'), got 'train'",
    ):
        assert part in message


def test_strategies_by_name():
    assert isinstance(compose("strategy=local").build_strategy(), LocalOnly)
    assert isinstance(compose("strategy=groupfedavg").build_strategy(), GroupFedAvg)
    assert isinstance(compose("strategy=lgfedavg").build_strategy(), LGFedAvg)
    assert isinstance(compose("strategy=fedproto").build_strategy(), FedProto)
    assert isinstance(compose("strategy=fml").build_strategy(), FML)
    kd = compose("strategy=fedkd strategy.t_start=0.9").build_strategy()
    assert isinstance(kd, FedKD) and (kd.t_start, kd.t_end) == (0.9, 0.98)
    strat = compose("transfer_every=2 adapter=rows").build_strategy()
    assert isinstance(strat, MergeNet) and strat.transfer_every == 2
    assert strat.hypernet.cfg.adapter.combos == (("rows", "rows"),)


def test_partition_ids_map_to_client_groups():
    cfg = compose("federation=tiny")
    spec, index = cfg.client(1)
    assert spec.arch == "mobilenet_v2_small" and index == 1
    assert [c.arch for c in cfg.peers(spec.dataset)] == ["resnet8", "mobilenet_v2_small"]
    with pytest.raises(ConfigError, match="partition-id 3 is outside the federation's 3 clients"):
        cfg.client(3)


def test_members_of_a_group_start_from_one_model_and_groups_from_their_own():
    cfg = compose("federation=tiny federation.clients.0.count=2")  # resnet8 ×2, mobilenet, bert
    first, second = (build_workload(cfg, i).initial_state for i in (0, 1))
    assert all(torch.equal(first[k], second[k]) for k in first)  # as FedAvg starts them
    again = build_workload(compose("federation=tiny federation.clients.0.count=2 seed=1"), 0)
    assert not torch.equal(again.initial_state["fc.weight"], first["fc.weight"])


def test_workload_of_a_synthetic_client():
    work = build_workload(compose("federation=tiny"), 2)
    assert work.identity.client_id == "client-2" and work.identity.group == "bert-text"
    assert [layer.name for layer in work.layers] == ["bert.encoder.layer.1.attention.self.value"]
    assert len(work.train_set) == 128 and len(work.eval_set) == 128
    assert sum(work.data.label_counts) == 128 and len(work.data.label_counts) == 2


def test_validation_rows_are_training_rows_no_client_holds():
    test_mode = compose("federation=tiny")
    val_mode = compose("federation=tiny eval_split=validation")
    images = data.synthetic_images(2500, 4, seed=0)[0][:2000]  # the training rows
    rows = {image.tobytes(): i for i, image in enumerate(images)}
    assert len(rows) == len(images)

    def row_ids(dataset) -> set[int]:  # back from the [N, 3, 32, 32] uint8 tensor to rows
        return {rows[p.tobytes()] for p in dataset.images.permute(0, 2, 3, 1).numpy()}

    held = set()
    for pid in (0, 1):  # the two clients on synthetic-images
        work, val_work = build_workload(test_mode, pid), build_workload(val_mode, pid)
        assert torch.equal(work.train_set.images, val_work.train_set.images)
        held |= row_ids(val_work.train_set)
    validation = row_ids(build_workload(val_mode, 0).eval_set)
    assert len(validation) == 128 and not validation & held


@needs_real_data
def test_cross_task_federation_builds_a_qa_client_on_real_data():
    cfg = compose(
        "federation=crosstask federation.examples_per_client=16 federation.test_examples=8"
    )
    work = build_workload(cfg, 1)
    assert work.identity.group == "distilbert-squad2"
    assert [layer.name for layer in work.layers] == [
        "distilbert.transformer.layer.1.attention.v_lin"
    ]
    out = work.task.train(work.model, work.train_set, epochs=1, batch_size=8, seed=0)
    assert out["num_examples"] == 16
    scores = work.task.evaluate(work.model, work.eval_set, batch_size=8)
    assert {"em", "f1", "loss"} <= set(scores) and 0.0 <= scores["f1"] <= 1.0


def test_local_test_rows_follow_each_clients_label_mix():
    cfg = compose(
        "federation=tiny eval_split=local federation.partition=dirichlet federation.alpha=0.3"
    )
    uniform = compose("federation=tiny federation.partition=dirichlet federation.alpha=0.3")
    shares = []
    for pid in (0, 1):  # the two clients on synthetic-images
        work = build_workload(cfg, pid)
        train = np.bincount(work.train_set.labels.numpy(), minlength=4) / len(work.train_set)
        test = np.bincount(work.eval_set.labels.numpy(), minlength=4) / len(work.eval_set)
        assert len(work.eval_set) == 128 and np.abs(train - test).max() <= 0.01
        other = build_workload(uniform, pid)
        assert torch.equal(work.train_set.images, other.train_set.images)
        # the global test beside: the uniform rows eval_split=test scores
        assert torch.equal(work.data.global_set.images, other.eval_set.images)
        assert other.data.global_set is None
        shares.append(test)
    assert np.abs(shares[0] - shares[1]).max() > 0.2  # label skew shows in the test rows too
    flat = np.bincount(build_workload(uniform, 0).eval_set.labels.numpy(), minlength=4) / 128
    assert np.abs(flat - 0.25).max() < 0.1  # eval_split=test: the test split's own mix


def test_htfllib_protocol_sets_its_training_and_evaluation_and_overrides_still_win():
    cfg = compose("federation=htfe4 protocol=htfllib")
    assert (cfg.batch_size, cfg.local_epochs, cfg.local_steps) == (10, 1, None)
    assert (cfg.augment, cfg.bn_calibration, cfg.optimizer_state) == (False, False, "fresh")
    assert (cfg.split, cfg.test_fraction, cfg.min_partition_size) == ("pooled", 0.25, 40)
    for task in ("image_classification", "text_classification"):  # SGD 0.01 for every task
        train = cfg.train_config(task)
        assert (train.optimizer, train.lr, train.momentum) == ("sgd", 0.01, 0.0)
        assert (train.weight_decay, train.max_grad_norm) == (0.0, None)
    assert compose("federation=htfe4 protocol=htfllib batch_size=32").batch_size == 32
    default = compose("federation=htfe4")
    assert default.train_config("image_classification") == get_task("image_classification").config
    assert (default.batch_size, default.augment, default.split) == (32, True, "standard")


def test_full_scale_is_htfllibs_amounts_and_rounds_on_a_gpu():
    cfg = compose("federation=htfe4 protocol=htfllib scale=full")
    assert (cfg.num_rounds, cfg.device, cfg.client_gpus) == (2000, "cuda", 0.2)
    assert cfg.examples_per_client >= 60_000  # no cap: each client keeps its whole share
    assert compose("federation=htfe4 protocol=htfllib").num_rounds == 5  # scale=default


def test_a_configured_client_lr_is_every_clients_and_bad_optimiser_settings_are_named():
    cfg = compose(
        "federation=tiny federation.examples_per_client=16 "
        "client_optimizer.lr=0.02 client_optimizer.momentum=0.5"
    )
    work = build_workload(cfg, 0)
    assert work.lr == 0.02 and work.task.config.momentum == 0.5
    with pytest.raises(ConfigError) as info:
        compose("client_optimizer.momentum=1.5 client_optimizer.lr=fast +client_optimizer.beta=1")
    text = str(info.value)
    assert "client_optimizer.beta is unknown" in text
    assert "client_optimizer.lr must be a number or null, got 'fast'" in text
    assert "TrainConfig.momentum must be in [0, 1), got 1.5" in text


def test_the_reference_pairing_transfers_into_a_batchnorm_followed_1x1_convolution():
    from simulations.models import build_model
    from simulations.preflight import problems

    cfg = compose("federation=reference protocol=reference num_rounds=40")
    target, source = cfg.clients
    assert cfg.partition == "same" and source.send_only and not target.send_only
    assert (cfg.batch_size, cfg.local_steps, cfg.optimizer_state) == (128, 4, "kept")
    assert cfg.strategy["delta_steps"] == 1 and cfg.client_optimizer["lr"] == 0.1
    model = build_model(target.arch, 10)
    (layer,) = target.layers
    conv = model.get_submodule(layer)
    following = model.get_submodule(layer.rsplit(".", 1)[0] + ".3")  # the next module
    assert conv.kernel_size == (1, 1) and isinstance(following, torch.nn.BatchNorm2d)
    assert following.num_features == conv.out_channels
    assert build_model(source.arch, 10).get_submodule(source.layers[0]).out_features == 10
    assert problems(cfg) == [] or all("data file" in p for p in problems(cfg))


@needs_real_data
def test_the_hub_draws_uniform_rows_and_the_poor_clients_split_the_rest_with_label_skew():
    cfg = compose("federation=hub")
    assert cfg.num_clients == 9 and cfg.clients[0].partition == "iid"
    labels = data.load_cifar10("train")[1]
    from simulations.federation import _partitions

    parts = _partitions(cfg, "cifar10", labels)
    hub, poor = parts[0], parts[1:]
    assert len(hub) == 10_000 and all(len(p) <= 200 for p in poor)
    assert not set(hub) & set(np.concatenate(poor))  # disjoint
    assert len(np.unique(np.concatenate(poor))) == sum(len(p) for p in poor)
    hub_share = np.bincount(labels[hub], minlength=10) / len(hub)
    assert hub_share.min() > 0.08  # uniform: about 0.1 each
    skew = [np.bincount(labels[p], minlength=10).max() / len(p) for p in poor]
    assert np.mean(skew) > 0.3  # label skew: a dominant class
    # a federation without an IID group splits as before: one flwr-datasets partition
    plain = compose("federation=hub federation.clients.0.partition=null")
    expected = data.partitions(
        labels, 9, "dirichlet", alpha=0.3, seed=0, max_examples=[10_000] + [200] * 8
    )
    got = _partitions(plain, "cifar10", labels)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    # an IID federation: the hub still gets its 10,000 rows (an even ninth holds 5,555)
    iid = _partitions(compose("federation=hub federation.partition=iid"), "cifar10", labels)
    assert len(iid[0]) == 10_000 and [len(p) for p in iid[1:]] == [200] * 8
    assert len(np.unique(np.concatenate(iid))) == 10_000 + 8 * 200
    # ... and one whose clients all fit an even shard splits as before
    even = compose("federation=hub federation.partition=iid federation.clients.0.examples=200")
    expected = data.partitions(labels, 9, "iid", seed=0, max_examples=[200] * 9)
    got = _partitions(even, "cifar10", labels)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    with pytest.raises(ConfigError, match=r"clients\[0\].partition must be iid"):
        compose("federation=hub federation.clients.0.partition=dirichlet")
