"""What transformers' own model tests read from a model class, pinned for every family's ShortV classes: the main
input is the forward's first argument (``test_model_main_input_name``), and a bare ``ShortV<Family>Model(config)``
initialises its frozen layers as the stock model initialises those layers (``test_can_init_all_missing_weights``):
here bitwise, since the ShortV model builds the stock one first and its frozen layers take the replaced layers'
weights. The model's forward shows the stock signature (``test_inputs_embeds*`` and the eager-vs-SDPA tests read
it)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import tiny_dir
from transformers import CONFIG_MAPPING

from shortv_export.families import FAMILIES
from shortv_export.models import SUPPORTED, shortv_config_dict

FROZEN = [0, 2]


def _classes(kind: str):
    generation = SUPPORTED[kind].model_cls
    model = generation.shortv_model_class
    return generation, model, model.__bases__[-1]  # ShortV<Family>Model(mixin, <Family>Model)


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_main_input_is_the_first_forward_argument(kind):
    for cls in _classes(kind)[:2]:
        first = list(inspect.signature(cls.forward).parameters)[1]
        assert first == cls.main_input_name == "input_ids", (cls.__name__, first)


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_bare_model_initialises_its_frozen_layers_as_stock_does(kind):
    _, shortv_cls, stock_cls = _classes(kind)
    base = json.loads((tiny_dir(kind) / "config.json").read_text())
    config = SUPPORTED[kind].config_cls.from_dict(
        {k: v for k, v in shortv_config_dict(base, FROZEN).items() if k != "auto_map"}
    )
    torch.manual_seed(0)
    stock = stock_cls(CONFIG_MAPPING[kind].from_dict(base))
    torch.manual_seed(0)
    ours = shortv_cls(config)
    stock_layers = _layers(stock)
    our_layers = _layers(ours)
    for i in FROZEN:
        assert type(our_layers[i]).__name__.startswith("ShortV")
        theirs, mine = stock_layers[i].state_dict(), our_layers[i].state_dict()
        assert theirs.keys() == mine.keys()
        for name, tensor in theirs.items():
            assert torch.equal(tensor, mine[name]), (i, name)


def _layers(model):
    return (model.language_model if "language_model" in model._modules else model.text_model).layers


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_model_forward_shows_the_stock_signature(kind):
    _, shortv_cls, stock_cls = _classes(kind)
    ours, stock = inspect.signature(shortv_cls.forward).parameters, inspect.signature(stock_cls.forward).parameters
    assert list(ours) == list(stock)
    assert {"inputs_embeds", "attention_mask"} <= set(ours)
