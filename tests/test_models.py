"""Tests of simulations.models: registry, shapes, transfer layers, local weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from simulations.models import ARCHITECTURES, build_model

IMAGE_ARCHS = [
    "resnet18",
    "resnet8",
    "resnet8_f512",
    "convnet5",
    "convnet6",
    "mobilenet_v2",
    "mobilenet_v2_small",
]
TEXT_ARCHS = ["fasttext", "textcnn", "bert_tiny", "bert_small"]

# Expected transfer layers: module name -> (in_features, out_features), num_classes = 5.
EXPECTED_LAYERS = {
    "cnn4": {"fc": (512, 5)},
    "resnet18": {"fc": (512, 5)},
    "resnet8": {"fc": (64, 5)},
    "resnet8_f512": {"fc": (512, 5)},
    "convnet5": {"fc": (512, 5)},
    "convnet6": {"fc": (512, 5)},
    "mobilenet_v2": {"classifier.1": (1280, 5)},
    "mobilenet_v2_small": {"classifier.1": (1280, 5)},
    "bert_tiny": {
        "classifier": (128, 5),
        "bert.encoder.layer.0.attention.self.value": (128, 128),
        "bert.encoder.layer.1.attention.self.value": (128, 128),
    },
    "fasttext": {"fc": (128, 5)},
    "textcnn": {"fc": (128, 5)},
    "bert_small": {
        "classifier": (256, 5),
        **{f"bert.encoder.layer.{i}.attention.self.value": (256, 256) for i in range(4)},
    },
    "distilbert_tiny_qa": {
        "qa_outputs": (128, 2),
        "distilbert.transformer.layer.0.attention.v_lin": (128, 128),
        "distilbert.transformer.layer.1.attention.v_lin": (128, 128),
    },
}


def _num_classes(arch: str) -> int:
    return 2 if arch == "distilbert_tiny_qa" else 5


def test_registry_lists_every_arch():
    assert set(ARCHITECTURES) == set(EXPECTED_LAYERS)
    for name, spec in ARCHITECTURES.items():
        assert spec.name == name
        assert set(spec.transfer_layers) == set(EXPECTED_LAYERS[name])


@pytest.mark.parametrize("arch", sorted(EXPECTED_LAYERS))
def test_transfer_layers_exist_with_expected_shapes(arch: str):
    model = build_model(arch, _num_classes(arch), seed=0)
    modules = dict(model.named_modules())
    for name, (fan_in, fan_out) in EXPECTED_LAYERS[arch].items():
        layer = modules[name]
        assert isinstance(layer, nn.Linear), name
        assert (layer.in_features, layer.out_features) == (fan_in, fan_out), name


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_image_models_output_shape(arch: str):
    model = build_model(arch, 5, seed=0).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_cnns_keep_resolution_for_32px_inputs():
    resnet = build_model("resnet18", 10)
    assert resnet.conv1.stride == (1, 1) and resnet.conv1.kernel_size == (3, 3)
    assert isinstance(resnet.maxpool, nn.Identity)
    for arch in ("mobilenet_v2", "mobilenet_v2_small"):
        features = build_model(arch, 10).eval().features
        with torch.no_grad():
            assert features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_text_models_output_shape(arch: str):
    model = build_model(arch, 5, seed=0).eval()
    ids = torch.randint(0, 30522, (3, 11))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (3, 5)


def test_qa_model_output_shape_and_class_check():
    model = build_model("distilbert_tiny_qa", 2, seed=0).eval()
    ids = torch.randint(0, 30522, (2, 9))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.start_logits.shape == out.end_logits.shape == (2, 9)
    with pytest.raises(ValueError, match="num_classes must be 2"):
        build_model("distilbert_tiny_qa", 3)


def test_unknown_arch_lists_known_names():
    with pytest.raises(ValueError, match="unknown arch 'vgg11'") as info:
        build_model("vgg11", 10)
    for name in ARCHITECTURES:
        assert name in str(info.value)


def test_seeded_build_is_reproducible_and_keeps_global_rng():
    state = torch.random.get_rng_state()
    a = build_model("resnet8", 10, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model("resnet8", 10, seed=3)
    c = build_model("resnet8", 10, seed=4)
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_missing_pretrained_path_is_named(tmp_path: Path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_model("resnet8", 10, pretrained_path=missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_model("bert_tiny", 2, pretrained_path=missing)


def test_state_dict_weights_load(tmp_path: Path):
    source = build_model("resnet8", 10, seed=1)
    path = tmp_path / "resnet8.pt"
    torch.save(source.state_dict(), path)
    loaded = build_model("resnet8", 10, pretrained_path=path, seed=2)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_transformers_weights_load_from_directory(tmp_path: Path):
    source = build_model("bert_tiny", 3, seed=1)
    source.save_pretrained(tmp_path)
    loaded = build_model("bert_tiny", 3, pretrained_path=tmp_path, seed=2)
    name = "bert.encoder.layer.1.attention.self.value"
    a = dict(source.named_modules())[name].weight
    b = dict(loaded.named_modules())[name].weight
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="directory"):
        build_model("bert_tiny", 3, pretrained_path=tmp_path / "model.safetensors")
