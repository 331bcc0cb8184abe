"""Client precision (fp32, bf16 autocast, auto) and channels-last layout."""

import json

import pytest
import torch
import torch.nn.functional as F

from harness import FakeGrid, app_nodes, set_task_identity
from simulations import numerics
from simulations.client_app import make_client_app
from simulations.config import ConfigError, compose
from simulations.models import build_model
from simulations.numerics import Numerics
from simulations.server_app import run_server
from simulations.tasks import TrainState, get_task

CHANNELS_LAST = Numerics(channels_last=True)
BF16 = Numerics("bf16", channels_last=True)


def images(n: int = 16, seed: int = 0) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()  # learnable: the red channel's mean
    return torch.utils.data.TensorDataset(x, y)


@pytest.mark.parametrize("arch", ["cnn4", "resnet8", "mobilenet_v2_small"])
def test_channels_last_computes_what_the_default_layout_computes(arch):
    x = images(8)[:][0]
    model = build_model(arch, 10, seed=0).eval()
    expected = model(x)
    with CHANNELS_LAST.layout(model):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()
        got = model(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert all(p.is_contiguous() for p in model.parameters())  # back to the default layout


def test_channels_last_training_matches_the_default_layout_and_keeps_the_parameters():
    data = images(32)
    task = get_task("image_classification")
    default, last = build_model("cnn4", 2, seed=0), build_model("cnn4", 2, seed=0)
    params = list(last.parameters())
    run = dict(batch_size=8, seed=1, steps=6, lr=0.05)
    task.train(default, data, state=TrainState(), **run)
    state = TrainState()
    task.train(last, data, state=state, numerics=CHANNELS_LAST, **run)
    assert [id(p) for p in last.parameters()] == [id(p) for p in params]
    for (name, a), b in zip(default.state_dict().items(), last.state_dict().values(), strict=True):
        assert b.is_contiguous(), name
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), name
    task.train(last, data, state=state, numerics=CHANNELS_LAST, **run)  # kept momentum loads


def test_bf16_runs_the_forward_in_bf16_and_keeps_weights_loss_and_gradients_in_fp32():
    data = images(16)
    model = build_model("cnn4", 2, seed=0)
    seen: list[torch.dtype] = []
    model.conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    task = get_task("image_classification")
    metrics = task.train(model, data, batch_size=8, seed=0, steps=2, numerics=BF16)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    seen.clear()
    scores = task.evaluate(model, data, batch_size=16, numerics=BF16)
    assert seen == [torch.bfloat16] and 0 <= scores["accuracy"] <= 1
    seen.clear()
    task.train(model, data, batch_size=8, seed=0, steps=1)  # the default stays fp32
    assert seen == [torch.float32]


def test_bf16_evaluation_scores_what_fp32_scores_within_rounding():
    data = images(64)
    model = build_model("resnet8", 2, seed=0)
    task = get_task("image_classification")
    task.train(model, data, batch_size=16, seed=0, steps=8, lr=0.05)
    fp32 = task.evaluate(model, data, batch_size=64)
    bf16 = task.evaluate(model, data, batch_size=64, numerics=BF16)
    assert abs(fp32["loss"] - bf16["loss"]) < 0.05 * fp32["loss"] + 0.01
    assert abs(fp32["accuracy"] - bf16["accuracy"]) <= 4 / 64


def test_evaluation_leaves_the_model_trainable():
    data = images(16)
    model = build_model("cnn4", 2, seed=0)
    task = get_task("image_classification")
    task.evaluate(model, data, batch_size=16, numerics=CHANNELS_LAST)
    task.train(model, data, batch_size=8, seed=0, steps=1)  # no inference tensors left behind
    logits = model(data[:4][0])
    F.cross_entropy(logits, data[:4][1]).backward()
    assert model.conv1.weight.grad is not None


@pytest.mark.parametrize(
    ("precision", "fast", "expected"),
    [
        ("auto", True, "bf16"),
        ("auto", False, "fp32"),
        ("fp32", True, "fp32"),
        ("bf16", False, "bf16"),  # asked for: honoured, with a warning
    ],
)
def test_auto_takes_bf16_only_where_the_hardware_has_it(monkeypatch, precision, fast, expected):
    monkeypatch.setattr(numerics, "bf16_is_fast", lambda device: fast)
    assert Numerics.resolve(precision, True, torch.device("cpu")).precision == expected


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "fast"),
    [(True, False, True), (False, True, True), (False, False, False)],
)
def test_the_cpu_probe_reads_pytorchs_amx_and_avx512_bf16_checks(
    monkeypatch, amx, avx512_bf16, fast
):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert numerics.bf16_is_fast(torch.device("cpu")) is fast


def test_bad_precision_settings_are_refused_by_name():
    with pytest.raises(ConfigError) as err:
        compose("precision=fp16 channels_last=maybe eval_batch_size=0")
    for key in ("precision must be one of", "channels_last", "eval_batch_size"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="resolve 'auto'"):
        Numerics("auto")  # type: ignore[arg-type]


# One image and one text model of `tiny` (both modalities), small enough for emulated bf16.
TWO_MODALITIES = (
    "federation.clients=["
    "{group: cnn4-images, arch: cnn4, task: image_classification, dataset: synthetic-images,"
    " count: 1, layers: [fc]},"
    "{group: bert-text, arch: bert_tiny, task: text_classification, dataset: synthetic-text,"
    " count: 1, layers: [bert.encoder.layer.1.attention.self.value]}]"
)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_tiny_federation_learns_in_either_precision(tmp_path, precision):
    set_task_identity()
    cfg = compose(
        ["federation=tiny", TWO_MODALITIES, "strategy=local", "num_rounds=3", "local_epochs=2"]
        + [f"precision={precision}", "checkpoint=false"]
    )
    nodes = app_nodes(make_client_app(lambda context: cfg), cfg.num_clients)
    run_server(FakeGrid(nodes), cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scores = {
        (x["group"], x["round"]): x for x in lines if x.get("stage") == "evaluate" and "group" in x
    }
    for group in ("cnn4-images", "bert-text"):
        last = scores[(group, cfg.num_rounds)]
        assert last["accuracy"] >= last["chance"] + 0.15, (group, last)


@pytest.mark.parametrize("calibrate", [True, False])
def test_batchnorm_is_re_estimated_only_where_the_config_asks(calibrate):
    from simulations.client_app import scored_model
    from simulations.federation import build_workload

    cfg = compose(
        ["federation=tiny_htfe", "federation.examples_per_client=64", f"bn_calibration={calibrate}"]
    )
    work = build_workload(cfg, 0)  # cnn4: BatchNorm
    work.task.train(work.model, work.train_set, steps=2, batch_size=16, seed=0)
    scored = scored_model(cfg, work)
    running = [m.running_mean for m in work.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    scored_means = [m.running_mean for m in scored.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if calibrate:
        assert scored is not work.model
        assert not torch.allclose(scored_means[0], running[0], atol=1e-4)
    else:
        assert scored is work.model  # scored with its running statistics, as HtFLlib does
