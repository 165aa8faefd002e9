"""What transformers' own model tests read from a model class, pinned for every family's ShortV classes: the main
input is the forward's first argument (``test_model_main_input_name``), and a bare ``ShortV<Family>Model(config)``
initialises its frozen layers as the stock model initialises those layers (``test_can_init_all_missing_weights``):
here bitwise, since the ShortV model builds the stock one first and its frozen layers take the replaced layers'
weights. The model's forward shows the stock signature (``test_inputs_embeds*`` and the eager-vs-SDPA tests read
it); a frozen layer's attention map is in the autograd graph of the text outputs
(``test_retain_grad_hidden_states_attentions``) and there, of the stock shape, also in a call with no text row
(``test_attention_outputs`` on the Idefics3 tester's image-only inputs); and every Auto class the stock model_type
is registered under loads a ShortV checkpoint with remote code."""

from __future__ import annotations

import inspect
import json
from functools import cache

import pytest
import torch
from click.testing import CliRunner
from conftest import batch, image, processor_for, tiny_dir
from transformers import CONFIG_MAPPING
from transformers.models.auto import modeling_auto

from shortv_export.cli import main
from shortv_export.families import FAMILIES
from shortv_export.models import SUPPORTED, load_shortv, shortv_config_dict, visual_token_ids

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


@cache
def _eager(kind: str):
    return load_shortv(tiny_dir(kind), FROZEN, attn_implementation="eager")


def _image_and_text(kind: str) -> dict:
    return batch(processor_for(tiny_dir(kind)), [("what is this ?", [image(40, 50, 0)])])


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_frozen_layers_attention_map_is_in_the_graph_of_the_text_outputs(kind):
    """``test_retain_grad_hidden_states_attentions``, backpropagating from a text position (the prompt's last): every
    layer's map gets a gradient, a frozen layer's zero on its visual rows (they are not queries)."""
    model = _eager(kind)
    inputs = _image_and_text(kind)
    outputs = model(**inputs, output_attentions=True, output_hidden_states=True)
    for tensor in (*outputs.attentions, *outputs.hidden_states):
        tensor.retain_grad()
    outputs.logits[0, -1, 0].backward()
    assert all(h.grad is not None for h in outputs.hidden_states)
    visual = torch.isin(inputs["input_ids"][0], torch.tensor(visual_token_ids(model.config)))
    for i, attention in enumerate(outputs.attentions):
        assert attention.grad is not None, i
        if i in FROZEN:
            assert attention.grad[0, :, ~visual].any() and not attention.grad[0, :, visual].any(), i


def _image_only(kind: str) -> dict:
    """A call with only visual rows (an image-only prefill chunk, as the Idefics3 tester's inputs): the processor's
    inputs for one image, cut to the visual placeholder tokens, which the stock forward takes as they are (its
    placeholder count still equals the image features')."""
    inputs = _image_and_text(kind)
    ids = inputs["input_ids"]
    visual = torch.isin(ids, torch.tensor(visual_token_ids(_eager(kind).config)))
    return {k: v[visual][None] if torch.is_tensor(v) and v.shape == ids.shape else v for k, v in inputs.items()}


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_frozen_layer_returns_a_map_of_the_stock_shape_in_a_call_with_no_text_row(kind):
    """``test_attention_outputs`` on image-only inputs: one [B, heads, S, S] map per layer, a frozen layer's zero (no
    row is a query) and in the graph (``test_retain_grad_hidden_states_attentions`` takes the first layer's)."""
    model = _eager(kind)
    inputs = _image_only(kind)
    outputs = model(**inputs, output_attentions=True)
    text_config = model.config.text_config
    seq = inputs["input_ids"].shape[1]
    assert len(outputs.attentions) == text_config.num_hidden_layers
    for i, attention in enumerate(outputs.attentions):
        assert attention.shape == (1, text_config.num_attention_heads, seq, seq), i
        attention.retain_grad()
    outputs.logits.flatten()[0].backward()
    for i in FROZEN:
        assert not outputs.attentions[i].any() and outputs.attentions[i].grad is not None, i


def _stock_auto_classes(kind: str) -> dict[str, str]:
    """Auto class -> the stock class it loads a ``kind`` checkpoint as, as transformers registers them."""
    config_cls = CONFIG_MAPPING[kind]
    autos = (getattr(modeling_auto, name) for name in dir(modeling_auto) if name.startswith("AutoModel"))
    return {
        auto.__name__: auto._model_mapping[config_cls].__name__
        for auto in autos
        if hasattr(auto, "_model_mapping") and config_cls in auto._model_mapping
    }


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_auto_class_of_the_stock_type_loads_a_shortv_checkpoint(kind, tmp_path):
    """Each with ``trust_remote_code=True`` gives the ShortV class in the stock class's role (``AutoModel``: the
    generation class, as documented), freezing the converted layers."""
    out = tmp_path / f"auto-classes-{kind}"  # a folder name of its own: dynamic modules are cached by it
    result = CliRunner().invoke(main, [str(tiny_dir(kind)), "--layers", "1", "--out", str(out), "-q", "--no-verify"])
    assert result.exit_code == 0, result.output
    generation = SUPPORTED[kind].model_cls.__name__
    stock = _stock_auto_classes(kind)
    assert {"AutoModel", "AutoModelForImageTextToText"} <= stock.keys()
    for auto, stock_cls in stock.items():
        model = getattr(modeling_auto, auto).from_pretrained(out, trust_remote_code=True)
        expected = generation if auto == "AutoModel" else f"ShortV{stock_cls}"
        assert type(model).__name__ == expected, auto
        layer = model.model.shortv_text_model().layers[1]
        assert type(layer).__name__.startswith("ShortV") and model.config.shortv_layers == [1], auto
