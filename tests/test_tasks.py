"""Tests of simulations.tasks: registry, configs, training loops, QA metrics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from simulations import data as D
from simulations.models import build_model
from simulations.tasks import (
    TASKS,
    Task,
    TrainConfig,
    TrainState,
    decode_best_span,
    get_task,
    plan_batches,
    squad_exact_match,
    squad_f1,
    squad_normalize,
)


@pytest.fixture(scope="module")
def tokenizer():
    if not (D.default_data_dir() / "bert-base-uncased" / "vocab.txt").is_file():
        pytest.skip(f"vocab.txt not found under {D.default_data_dir()}")
    return D.build_tokenizer()


@pytest.fixture(scope="module")
def image_data() -> tuple[D.ImageDataset, D.ImageDataset]:
    images, labels = D.synthetic_images(160, 4, seed=0)
    return D.ImageDataset(images, labels, train=True), D.ImageDataset(images, labels, train=False)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------
# Registry and config
# --------------------------------------------------------------------------------------


def test_registry_and_protocol():
    assert set(TASKS) == {"image_classification", "text_classification", "extractive_qa"}
    for name in TASKS:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
    assert get_task("image_classification").config.optimizer == "sgd"
    assert get_task("text_classification").config.optimizer == "adamw"
    assert get_task("extractive_qa").config.optimizer == "adamw"
    custom = TrainConfig(optimizer="adamw", lr=1e-3)
    assert get_task("image_classification", custom).config is custom


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError, match="unknown task 'segmentation'.*extractive_qa"):
        get_task("segmentation")


def test_default_configs_match_the_brief():
    image = get_task("image_classification").config
    assert (image.momentum, image.weight_decay) == (0.9, 5e-4)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"optimizer": "adam"}, "TrainConfig.optimizer"),
        ({"lr": 0.0}, "TrainConfig.lr"),
        ({"momentum": 1.0}, "TrainConfig.momentum"),
        ({"weight_decay": -1.0}, "TrainConfig.weight_decay"),
        ({"max_grad_norm": 0.0}, "TrainConfig.max_grad_norm"),
        ({"num_workers": -1}, "TrainConfig.num_workers"),
    ],
)
def test_train_config_errors_name_the_field(kwargs: dict, field: str):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr")],
)
def test_train_rejects_bad_arguments(image_data, kwargs: dict, field: str):
    args = {"epochs": 1, "batch_size": 8, "seed": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        get_task("image_classification").train(build_model("resnet8", 4), image_data[0], **args)


# --------------------------------------------------------------------------------------
# Training lowers the loss, deterministically
# --------------------------------------------------------------------------------------


def test_image_training_lowers_loss(image_data):
    train_ds, eval_ds = image_data
    task = get_task("image_classification")
    model = build_model("resnet8", 4, seed=0)
    before = task.evaluate(model, eval_ds, batch_size=80)
    result = task.train(model, train_ds, epochs=6, batch_size=16, lr=0.05, seed=0)
    after = task.evaluate(model, eval_ds, batch_size=80)
    assert set(result) == {"train_loss", "train_steps", "train_seconds", "num_examples"}
    assert result["train_steps"] == 6 * 10
    assert result["num_examples"] == 160 and result["train_seconds"] > 0
    assert after["loss"] < before["loss"] - 0.5
    assert after["accuracy"] > 0.9
    assert after["num_examples"] == 160


@pytest.mark.slow
def test_mobilenet_eval_after_short_training_uses_recalibrated_batchnorm(image_data):
    # After a few dozen steps MobileNetV2's BatchNorm running statistics (momentum 0.1) lag far
    # behind its weights; the image task re-estimates them, so eval mode matches training.
    train_ds, eval_ds = image_data
    task = get_task("image_classification")
    model = build_model("mobilenet_v2_small", 4, seed=0)
    first = task.train(model, train_ds, epochs=1, batch_size=16, lr=0.02, seed=0)
    task.train(model, train_ds, epochs=2, batch_size=16, lr=0.02, seed=1)
    last = task.train(model, train_ds, epochs=1, batch_size=16, lr=0.02, seed=2)
    assert last["train_loss"] < 0.75 * first["train_loss"]
    running = {k: v.clone() for k, v in model.state_dict().items()}
    after = task.evaluate(model, eval_ds, batch_size=80, calibrate_on=train_ds)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in running.items())  # a copy
    assert after["loss"] < 2 * last["train_loss"] + 0.5
    assert after["accuracy"] > 0.5


def test_text_training_lowers_loss(tokenizer):
    texts, labels = D.synthetic_texts(128, 2, seed=0)
    ds = D.TextClassificationDataset(texts, labels, tokenizer, max_length=24)
    task = get_task("text_classification")
    model = build_model("bert_tiny", 2, seed=0)
    before = task.evaluate(model, ds, batch_size=64)
    task.train(model, ds, epochs=4, batch_size=16, lr=1e-3, seed=0)
    after = task.evaluate(model, ds, batch_size=64)
    assert after["loss"] < before["loss"] - 0.1
    assert after["accuracy"] > 0.8


def test_qa_training_lowers_loss_and_raises_f1(tokenizer):
    ds = D.QADataset(D.synthetic_qa_examples(96, seed=0), tokenizer, max_length=48)
    task = get_task("extractive_qa")
    model = build_model("distilbert_tiny_qa", 2, seed=0)
    before = task.evaluate(model, ds, batch_size=48)
    task.train(model, ds, epochs=4, batch_size=16, lr=1e-3, seed=0)
    after = task.evaluate(model, ds, batch_size=48)
    assert set(after) == {"loss", "em", "f1", "chance", "top_share", "eval_seconds", "num_examples"}
    impossible = sum(not e.answer_texts for e in ds.examples) / len(ds)
    assert after["chance"] == pytest.approx(impossible)
    assert after["loss"] < before["loss"] - 0.5
    assert after["f1"] > before["f1"]


def test_training_is_deterministic_and_keeps_global_rng(image_data):
    train_ds, _ = image_data
    task = get_task("image_classification")
    states = []
    for _ in range(2):
        model = build_model("resnet8", 4, seed=0)
        rng_state = torch.random.get_rng_state()
        task.train(model, Subset(train_ds, range(48)), epochs=1, batch_size=16, seed=7)
        assert torch.equal(torch.random.get_rng_state(), rng_state)
        states.append(_state(model))
    other = build_model("resnet8", 4, seed=0)
    task.train(other, Subset(train_ds, range(48)), epochs=1, batch_size=16, seed=8)
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
    assert not torch.equal(states[0]["fc.weight"], other.state_dict()["fc.weight"])


class _Recording(torch.utils.data.Dataset):
    """Rows 0..n-1 as tiny images; remembers which rows were read."""

    def __init__(self, n: int) -> None:
        self.n, self.read = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.read.append(i)
        return torch.full((3, 32, 32), float(i % 4)), torch.tensor(i % 4)


def test_local_steps_continue_where_the_last_round_stopped_and_cover_the_partition():
    data, state = _Recording(40), TrainState()
    task = get_task("image_classification")
    model = build_model("resnet8", 4, seed=0)
    visited = []
    for rnd in range(3):  # 3 rounds of 4 batches of 8 rows; an epoch is 5 batches
        data.read.clear()
        out = task.train(model, data, steps=4, batch_size=8, seed=rnd, data_seed=5, state=state)
        assert out["train_steps"] == 4
        visited.append(data.read[: 4 * 8])  # BatchNorm re-estimation reads them again
    epoch0 = visited[0] + visited[1][:8]
    assert sorted(epoch0) == list(range(40))  # the first 5 batches are one whole epoch
    assert (state.epoch, state.batch) == (2, 2)  # 12 batches: epochs 0 and 1, then 2 of 2
    epoch1 = visited[1][8:] + visited[2][:16]
    assert sorted(epoch1) == list(range(40)) and epoch1 != epoch0  # epoch 1, another order
    assert visited[1][8:16] != visited[0][:8]
    assert state.optimizer is not None and state.optimizer["state"]  # momentum carried on


def test_plan_batches_is_deterministic_in_the_data_seed():
    first = plan_batches(10, 4, 6, TrainState(), data_seed=1)
    assert first == plan_batches(10, 4, 6, TrainState(), data_seed=1)
    assert [len(b) for b in first] == [4, 4, 2, 4, 4, 2]
    assert first != plan_batches(10, 4, 6, TrainState(), data_seed=2)


def test_optimizer_state_makes_split_rounds_equal_one_long_round(image_data):
    _, plain = image_data  # no augmentation: the same batches give the same steps
    task = get_task("image_classification")
    data = Subset(plain, range(48))
    whole, split, fresh = (build_model("resnet8", 4, seed=0) for _ in range(3))
    task.train(whole, data, steps=6, batch_size=8, seed=0, data_seed=3)
    state = TrainState()
    for _ in range(2):
        task.train(split, data, steps=3, batch_size=8, seed=0, data_seed=3, state=state)
    restart = TrainState()
    for _ in range(2):  # the place in the data is kept, the momentum is not
        task.train(fresh, data, steps=3, batch_size=8, seed=0, data_seed=3, state=restart)
        restart.optimizer = None
    assert torch.allclose(whole.fc.weight, split.fc.weight, atol=1e-6)
    assert not torch.allclose(whole.fc.weight, fresh.fc.weight, atol=1e-3)


def test_evaluate_reports_chance_and_a_model_stuck_on_one_class(image_data):
    _, eval_ds = image_data
    task = get_task("image_classification")
    model = build_model("resnet8", 4, seed=0)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # always class 2
    out = task.evaluate(model, eval_ds, batch_size=64)
    labels = torch.stack([eval_ds[i][1] for i in range(len(eval_ds))])
    assert out["chance"] == pytest.approx(labels.bincount().max().item() / len(labels))
    assert out["top_share"] == 1.0
    assert out["accuracy"] == pytest.approx((labels == 2).float().mean().item())
    assert out["eval_seconds"] > 0


def test_empty_dataset_reports_zero_examples(image_data):
    task = get_task("image_classification")
    model = build_model("resnet8", 4, seed=0)
    before = _state(model)
    empty = Subset(image_data[0], [])
    assert task.train(model, empty, epochs=1, batch_size=8, seed=0)["num_examples"] == 0
    assert task.evaluate(model, empty, batch_size=8)["num_examples"] == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------------------------
# QA metrics
# --------------------------------------------------------------------------------------


def test_squad_normalize():
    assert squad_normalize("  The Cat,  sat on a mat! ") == "cat sat on mat"
    assert squad_normalize("An apple") == "apple"
    assert squad_normalize("theory") == "theory"  # only whole-word articles go


def test_squad_exact_match_and_f1_on_hand_made_predictions():
    assert squad_exact_match("the Eiffel Tower.", ["Eiffel tower", "Paris"]) == 1.0
    assert squad_exact_match("Eiffel", ["Eiffel tower"]) == 0.0
    # "big red cat" vs "red cat sat": 2 shared tokens, precision = recall = 2/3.
    assert squad_f1("big red cat", ["red cat sat"]) == pytest.approx(2 / 3)
    assert squad_f1("big red cat", ["dog", "red cat sat"]) == pytest.approx(2 / 3)
    assert squad_f1("Eiffel", ["Eiffel tower"]) == pytest.approx(2 / 3)
    assert squad_f1("nothing here", ["Paris"]) == 0.0
    # Unanswerable: only the empty (CLS) prediction is right.
    assert squad_exact_match("", []) == squad_f1("", []) == 1.0
    assert squad_exact_match("Paris", []) == squad_f1("Paris", []) == 0.0
    assert squad_f1("", ["Paris"]) == 0.0


def test_decode_best_span_rules():
    length = 8
    context = torch.zeros(1, length, dtype=torch.bool)
    context[0, 3:7] = True

    def logits(values: dict[int, float]) -> torch.Tensor:
        out = torch.zeros(1, length)
        for i, v in values.items():
            out[0, i] = v
        return out

    # Best valid span (4, 5) beats the higher-scoring but non-context token 1.
    starts, ends = decode_best_span(logits({1: 9, 4: 5}), logits({1: 9, 5: 5}), context)
    assert (starts.item(), ends.item()) == (4, 5)
    # End before start is not allowed: start at 5, end at 4 -> best is (5, 5)-ish.
    starts, ends = decode_best_span(logits({5: 5}), logits({4: 5, 5: 1}), context)
    assert starts.item() <= ends.item()
    assert (starts.item(), ends.item()) == (5, 5)
    # Length limit: a 4-token span is rejected with max_answer_length=3.
    starts, ends = decode_best_span(logits({3: 5}), logits({6: 5}), context, 3)
    assert ends.item() - starts.item() + 1 <= 3
    # The CLS (null) score wins when it is at least the best span score.
    starts, ends = decode_best_span(logits({0: 6, 4: 3}), logits({0: 6, 5: 3}), context)
    assert (starts.item(), ends.item()) == (0, 0)
    # No context tokens at all: null.
    starts, ends = decode_best_span(logits({4: 3}), logits({5: 3}), torch.zeros_like(context))
    assert (starts.item(), ends.item()) == (0, 0)


class _FixedSpanModel(nn.Module):
    """Stub QA model: predicts a given token span for each input sequence."""

    def __init__(self, spans: dict[tuple[int, ...], tuple[int, int]]) -> None:
        super().__init__()
        self.spans = spans
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        start = torch.full(input_ids.shape, -10.0) + self.dummy
        end = start.clone()
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            s, e = self.spans[tuple(ids[mask.bool()].tolist())]
            start[row, s] = 10.0
            end[row, e] = 10.0
        return SimpleNamespace(start_logits=start, end_logits=end)


def _span_table(ds: D.QADataset, spans: list[tuple[int, int]]) -> dict:
    return {
        tuple(ds.input_ids[i][ds.attention_mask[i].bool()].tolist()): spans[i]
        for i in range(len(ds))
    }


def test_qa_evaluate_on_hand_made_predictions(tokenizer):
    examples = D.synthetic_qa_examples(24, seed=3)
    ds = D.QADataset(examples, tokenizer, max_length=48)
    n_impossible = sum(e.is_impossible for e in examples)
    assert 0 < n_impossible < len(examples)
    task = get_task("extractive_qa")

    gold = [(int(ds.start_positions[i]), int(ds.end_positions[i])) for i in range(len(ds))]
    perfect = task.evaluate(_FixedSpanModel(_span_table(ds, gold)), ds, batch_size=5)
    assert perfect["em"] == perfect["f1"] == 1.0
    assert perfect["loss"] < 1e-3 and perfect["num_examples"] == 24

    always_null = [(0, 0)] * len(ds)
    null = task.evaluate(_FixedSpanModel(_span_table(ds, always_null)), ds, batch_size=7)
    assert null["em"] == pytest.approx(n_impossible / len(examples))
    assert null["f1"] == pytest.approx(n_impossible / len(examples))

    # "<answer> ." still matches after normalisation (punctuation dropped);
    # "is <answer>" gets EM 0 and F1 2/3 on answerable questions.
    plus_dot = [(s, e + 1) if s else (0, 0) for s, e in gold]
    with_is = [(s - 1, e) if s else (0, 0) for s, e in gold]
    dot = task.evaluate(_FixedSpanModel(_span_table(ds, plus_dot)), ds, batch_size=24)
    assert dot["em"] == dot["f1"] == 1.0
    wide = task.evaluate(_FixedSpanModel(_span_table(ds, with_is)), ds, batch_size=24)
    answerable = 1 - n_impossible / len(examples)
    assert wide["em"] == pytest.approx(1 - answerable)
    assert wide["f1"] == pytest.approx(1 - answerable + answerable * 2 / 3)

    # A Subset of a QADataset is accepted; other datasets are not.
    sub = task.evaluate(_FixedSpanModel(_span_table(ds, gold)), Subset(ds, [1, 2]), batch_size=2)
    assert sub["em"] == 1.0 and sub["num_examples"] == 2
    with pytest.raises(TypeError, match="QADataset"):
        task.evaluate(
            _FixedSpanModel({}), D.ImageDataset(*D.synthetic_images(2, 2, 0), False), batch_size=2
        )
