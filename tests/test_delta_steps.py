"""``strategy.delta_steps=k``: a transfer round's gradient pieces measure the change of its
first ``k`` optimiser steps (the reference code's one step), the rest of the round is
self-learning."""

from copy import deepcopy

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from harness import set_task_identity
from mergenet_fl import as_spec, encode_factors, factorize, select_layers
from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.extension import MergeNetClient
from mergenet_fl.selection import get_matrix
from simulations.config import ConfigError, compose
from simulations.data import ImageDataset, synthetic_images
from simulations.models import build_model
from simulations.tasks import get_task

RANK = 4


def transfer_message(model, layers) -> Message:
    """A transfer round's train message: merged factors that move the head, and the own
    factors they replace."""
    set_task_identity()
    a, b = factorize(get_matrix(model, layers[0]), RANK)
    content = RecordDict({p.CONFIG: ConfigRecord({p.ROUND: 2, p.ADAPTER_RANK: RANK})})
    content[p.MERGED] = p.to_record(encode_factors({"fc": (a * 1.5, b)}))
    content[p.OWN] = p.to_record(encode_factors({"fc": (a, b)}))
    return Message(content, dst_node_id=1, message_type="train")


def pieces_of(records) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = p.from_record(records[p.PIECES])
    return tuple(torch.from_numpy(arrays[f"fc/{k}"]) for k in ("A", "B"))


@pytest.mark.parametrize("k", [1, 3])
def test_the_pieces_are_those_of_the_first_k_steps(k):
    data = ImageDataset(*synthetic_images(80, 4, 0), train=True)
    task = get_task("image_classification")
    model = build_model("resnet8", 4, seed=0)
    layers = select_layers(model, as_spec(["fc"]))
    msg = transfer_message(model, layers)
    by_hand = deepcopy(model)
    train = dict(batch_size=8, seed=5, lr=0.05)

    measured = MergeNetClient(layers, RANK, delta_steps=k)
    measured.begin(msg, model)
    task.train(model, data, steps=6, after_step=measured.after_step, **train)
    got = pieces_of(measured.end(msg, model, lambda: []))

    # by hand: the same install, the same first k batches, Δ = installed − trained
    whole = MergeNetClient(layers, RANK)
    whole.begin(msg, by_hand)
    installed = get_matrix(by_hand, layers[0]).detach().clone()
    task.train(by_hand, data, steps=k, after_step=whole.after_step, **train)
    delta = installed - get_matrix(by_hand, layers[0]).detach()
    a, b = whole.installed["fc"].a, whole.installed["fc"].b
    assert torch.allclose(got[0], delta @ b.T, atol=1e-6)
    assert torch.allclose(got[1], a.T @ delta, atol=1e-6)
    # the whole round's pieces differ: the steps after the k-th are self-learning
    assert not torch.allclose(pieces_of(whole.end(msg, model, lambda: []))[0], got[0])


def test_without_delta_steps_the_pieces_span_the_whole_round():
    data = ImageDataset(*synthetic_images(80, 4, 0), train=False)
    model = build_model("resnet8", 4, seed=0)
    layers = select_layers(model, as_spec(["fc"]))
    msg = transfer_message(model, layers)
    ext = MergeNetClient(layers, RANK)
    ext.begin(msg, model)
    installed = get_matrix(model, layers[0]).detach().clone()
    get_task("image_classification").train(
        model, data, steps=4, batch_size=8, seed=5, lr=0.05, after_step=ext.after_step
    )
    delta = installed - get_matrix(model, layers[0]).detach()
    ga, _ = pieces_of(ext.end(msg, model, lambda: []))
    assert torch.allclose(ga, delta @ ext.installed["fc"].b.T, atol=1e-6)


def test_delta_steps_is_checked_and_reaches_mergenets_client():
    cfg = compose("federation=tiny strategy.delta_steps=1")
    model = build_model("resnet8", 4, seed=0)
    ext = cfg.build_extension(model, "fc", 4, select_layers(model, as_spec(["fc"])))
    assert isinstance(ext, MergeNetClient) and ext.delta_steps == 1
    with pytest.raises(ConfigError, match="strategy.delta_steps must be null or an integer"):
        compose("federation=tiny strategy.delta_steps=0")
