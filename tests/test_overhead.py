"""What a frozen layer costs on top of the work it cannot avoid, counted on the CPU (no timing): aten operations
dispatched per layer, and host syncs (``aten::_local_scalar_dense``) per forward, ShortV vs the stock path.

On a GPU each dispatched operation is a kernel launch, and a sync stops the CPU from queueing ahead, so these
counts decide whether a launch-bound prefill (batch 1) can lose time to ShortV. The tiny model here has one
key/value head per query head, as LLaVA-1.5 and LLaVA-NeXT (Vicuna) do.
"""

from __future__ import annotations

from functools import cache

import pytest
from conftest import batch, image, tiny_dir
from transformers import AutoProcessor

from shortv_export.models import load_shortv
from shortv_export.overhead import dispatched

FROZEN = [4, 1, 3]


@cache
def model_and_processor(kind):
    folder = tiny_dir(kind, kv_heads=4)
    return load_shortv(folder, FROZEN, attn_implementation="sdpa").eval(), AutoProcessor.from_pretrained(folder)


ROWS = {
    1: [("what is the color of the shape ?", [image(40, 50, 0)])],
    2: [("what is the color of the shape ?", [image(40, 50, 0), image(64, 32, 1)]), ("what ?", [image(30, 90, 2)])],
}


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("rows", [1, 2])
def test_a_frozen_layer_dispatches_at_most_4_more_operations_than_a_stock_layer(kind, rows):
    """The first frozen layer also gathers the text rows' cos/sin from the text model's, once per forward
    (at most 12 operations): every later frozen layer reuses them."""
    model, processor = model_and_processor(kind)
    inputs = batch(processor, ROWS[rows], "left")
    vanilla, shortv = dispatched(model, inputs, []), dispatched(model, inputs, FROZEN)
    stock_layer = vanilla.per_layer[FROZEN[0]]
    assert all(vanilla.per_layer[i] == stock_layer for i in FROZEN)
    for i in range(len(model.model.language_model.layers)):
        extra = shortv.per_layer[i] - stock_layer
        if i == min(FROZEN):
            assert extra <= 4 + 12, (i, shortv.per_layer[i], stock_layer)
        else:
            assert extra <= 4 if i in FROZEN else extra == 0, (i, shortv.per_layer[i], stock_layer)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_one_prompt_makes_no_more_host_syncs_than_the_stock_path(kind):
    """Batch 1: the text width is known on the host (sequence length minus image features). A padded batch
    adds exactly one sync, for the widest row's text count, before the decoder layers are queued."""
    model, processor = model_and_processor(kind)
    syncs = {}
    for rows in (1, 2):
        inputs = batch(processor, ROWS[rows], "left")
        syncs[rows] = [dispatched(model, inputs, frozen).syncs for frozen in ([], FROZEN)]
    assert syncs[1][1] == syncs[1][0]
    assert syncs[2][1] == syncs[2][0] + 1
