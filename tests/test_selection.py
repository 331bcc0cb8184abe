import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18
from transformers import BertConfig, BertModel

from mergenet_fl import LayerSpec, SelectionError, as_spec, describe_selection, select_layers
from mergenet_fl.selection import get_matrix, set_matrix


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(4, 3)
        self.block = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Linear(6, 2))
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)
        self.norm = nn.LayerNorm(4)


@pytest.mark.parametrize(
    ("targets", "exclude", "expected"),
    [
        (["lin0"], [], ["lin0"]),
        (["0"], [], ["block.0"]),  # dotted suffix
        (["block.2"], [], ["block.2"]),
        ([r"block\.[02]"], [], ["block.0", "block.2"]),
        ([r"block\.[02]", "lin0"], ["2"], ["lin0", "block.0"]),
        ([r"(lin0|block\.0)"], [], ["lin0", "block.0"]),
    ],
)
def test_selection_table(targets, exclude, expected):
    got = [layer.name for layer in select_layers(Tiny(), LayerSpec(targets, exclude))]
    assert got == expected


def test_kinds_and_matrix_shapes():
    layers = {layer.name: layer for layer in select_layers(Tiny(), LayerSpec(["lin0", "block.0"]))}
    assert layers["lin0"].kind == "linear" and layers["lin0"].matrix_shape == (3, 4)
    assert layers["block.0"].kind == "conv2d" and layers["block.0"].matrix_shape == (5, 27)


def test_depthwise_and_other_kinds_are_refused_with_names():
    with pytest.raises(SelectionError, match=r"'depthwise'.*groups=4.*linear, conv2d"):
        select_layers(Tiny(), LayerSpec(["depthwise"]))
    with pytest.raises(SelectionError, match=r"'norm' is a LayerNorm"):
        select_layers(Tiny(), LayerSpec(["norm"]))
    with pytest.raises(SelectionError, match=r"'block.1' is a ReLU"):
        select_layers(Tiny(), LayerSpec([r"block\.\d"]))


def test_no_match_quotes_spec_and_candidates():
    with pytest.raises(SelectionError, match=r"targets=\['classifier'\].*candidates: \['lin0'"):
        select_layers(Tiny(), LayerSpec(["classifier"]))


def test_bad_specs():
    with pytest.raises(SelectionError, match="empty"):
        LayerSpec([])
    with pytest.raises(SelectionError, match="sequences"):
        LayerSpec("fc")
    assert as_spec("fc, layer4.1.conv2", "x").targets == ("fc", "layer4.1.conv2")


def test_conv_matrix_round_trip():
    model = Tiny()
    layer = select_layers(model, LayerSpec(["block.0"]))[0]
    m = get_matrix(model, layer)
    set_matrix(model, layer, m * 2)
    assert not torch.equal(get_matrix(model, layer), m)  # a copy, not a view of the weight
    assert torch.equal(model.block[0].weight, (m * 2).reshape(5, 3, 3, 3))
    with pytest.raises(SelectionError, match="does not fit"):
        set_matrix(model, layer, torch.zeros(27, 5))


def test_resnet18():
    model = resnet18(num_classes=10)
    names = [x.name for x in select_layers(model, LayerSpec(["fc", r"layer4\.\d\.conv2"]))]
    assert names == ["layer4.0.conv2", "layer4.1.conv2", "fc"]
    fc = select_layers(model, LayerSpec(["fc"]))[0]
    assert fc.matrix_shape == (10, 512)
    assert "layer4.1.conv2" in describe_selection(model, LayerSpec([r"layer4\.1\.conv2"]))


def test_mobilenet_v2():
    model = mobilenet_v2(num_classes=100)
    (cls,) = select_layers(model, LayerSpec(["classifier.1"]))
    assert cls.matrix_shape == (100, 1280)
    # features.17.conv.2 is the last block's 1x1 projection: 960 -> 320
    (proj,) = select_layers(model, LayerSpec(["features.17.conv.2"]))
    assert proj.kind == "conv2d" and proj.matrix_shape == (320, 960)
    with pytest.raises(SelectionError, match=r"'features.1.conv.0.0'.*grouped/depthwise"):
        select_layers(model, LayerSpec(["features.1.conv.0.0"]))


def test_bert_attention_value():
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = BertModel(cfg)
    names = [x.name for x in select_layers(model, LayerSpec(["attention.self.value"]))]
    assert names == [f"encoder.layer.{i}.attention.self.value" for i in range(3)]
    only_last = select_layers(
        model, LayerSpec(["attention.self.value"], exclude=[r"encoder\.layer\.[01]\..*"])
    )
    assert [x.name for x in only_last] == ["encoder.layer.2.attention.self.value"]
    assert only_last[0].matrix_shape == (32, 32)
