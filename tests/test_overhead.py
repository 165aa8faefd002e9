"""What a frozen layer costs on top of the work it cannot avoid, counted on the CPU (no timing): aten operations
dispatched per layer, and host syncs per forward, ShortV vs the stock path, for every family.

On a GPU each dispatched operation (views aside) is a kernel launch, and a sync stops the CPU from queueing ahead,
so these counts decide whether a launch-bound prefill (batch 1) can lose time to ShortV. Host syncs here are what
would make the CPU wait on CUDA (``shortv_export.overhead``): value reads, data-dependent shapes, and tensors made
from host data inside the forward. The tiny models have one key/value head per query head, as LLaVA-1.5 and
LLaVA-NeXT (Vicuna) do.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest
from conftest import batch, image, processor_for, tiny_dir

from shortv_export.models import load_shortv
from shortv_export.overhead import dispatched
from shortv_export.tiny import NEW_FAMILIES

FROZEN = [4, 1, 3]
KINDS = ["llava", "llava_next", *NEW_FAMILIES]
ROWS = {
    1: [("what is the color of the shape ?", [image(40, 50, 0)])],
    2: [("what is the color of the shape ?", [image(40, 50, 0), image(64, 32, 1)]), ("what ?", [image(30, 90, 2)])],
}
REPO = Path(__file__).resolve().parents[1]


@cache
def model_and_processor(kind):
    folder = tiny_dir(kind, kv_heads=4)
    return load_shortv(folder, FROZEN, attn_implementation="sdpa").eval(), processor_for(folder)


@cache
def counts(kind, rows):
    model, processor = model_and_processor(kind)
    inputs = batch(processor, ROWS[rows], "left")
    return model, dispatched(model, inputs, []), dispatched(model, inputs, FROZEN)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 2])
def test_a_frozen_layer_dispatches_at_most_4_more_operations_than_its_stock_layer(kind, rows):
    """Per frozen layer: the gathers of the residual and of the normed rows for Q and the scatter back (+3; a
    padded batch adds one ``where``). The first frozen layer of each attention type also gathers the text rows'
    cos/sin from the ones the text model made, once per forward: at most 9 operations more, 2 of them kernels.
    Every other layer dispatches exactly what it does in the stock model."""
    model, vanilla, shortv = counts(kind, rows)
    types = model.model._shortv_attention_types
    first = {min(i for i in FROZEN if types[i] == kind_) for kind_ in {types[i] for i in FROZEN}}
    for i in range(len(model.model.shortv_text_model().layers)):
        ops = shortv.per_layer[i] - vanilla.per_layer[i]
        kernels = shortv.kernels_per_layer[i] - vanilla.kernels_per_layer[i]
        if i not in FROZEN:
            assert ops == 0 and kernels == 0, (i, ops, kernels)
        elif i in first:  # at least its 2 gathers of cos/sin: the frozen branch really ran
            assert 2 <= kernels <= 4 + 2 and ops <= 4 + 9, (i, ops, kernels)
        else:
            assert ops <= 4 and kernels <= 4, (i, ops, kernels)


@pytest.mark.parametrize("kind", KINDS)
def test_one_prompt_makes_exactly_the_stock_host_syncs(kind):
    """Batch 1: the text width is known on the host (sequence length minus image features), the visual rows are
    found without a tensor of token ids (which would be a blocking host-to-device copy), and no cache is made for
    the masks (Gemma 3's sliding layers would each make a host tensor). A padded batch adds exactly one sync, for
    the widest row's text count, before the decoder layers are queued (the GPU is compute-bound there)."""
    for rows, extra in ((1, 0), (2, 1)):
        _, vanilla, shortv = counts(kind, rows)
        assert shortv.syncs == vanilla.syncs + extra, (rows, dict(vanilla.sync_ops), dict(shortv.sync_ops))


def test_the_prefill_bench_runs_and_prints_its_table(capsys):
    """scripts/bench_prefill.py is the GPU check prepared for a session with a device (scripts/gpu_bench.sh): it
    must not rot. Its launch shape (LLaVA-1.5-13B's layer pattern at a negligible width), 1 layer (frozen),
    batch 1 and 2, eager and compiled rows, prefill + 2 tokens, PyTorch and ONNX Runtime. Its main() in-process
    (the imports, not the script, would be most of a fresh process's time)."""
    spec = importlib.util.spec_from_file_location("bench_prefill", REPO / "scripts" / "bench_prefill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--shape", "launch", "--depth", "1", "--batch", "1,2", "--runs", "1", "--warmup", "0"]
    bench.main([*argv, "--decode-tokens", "2", "--compile", "eager", "--backend", "torch,onnx"])
    out = capsys.readouterr()
    rows = [line for line in out.out.splitlines() if line.startswith("| launch |")]
    modes = {tuple(cell.strip() for cell in row.split("|")[3:7]) for row in rows}
    assert ("1", "torch cpu", "fp32", "eager") in modes and ("2", "torch cpu", "fp32", "eager") in modes
    assert ("1", "torch cpu", "fp32", "compiled (eager)") in modes
    assert ("1", "onnxruntime cpu", "fp32", "eager") in modes
    assert ("1", "torch cpu", "fp32", "prefill + 2 tokens") in modes
    syncs = re.search(r"host syncs per forward: ShortV (\d+), vanilla (\d+)", out.out)
    assert syncs and syncs[1] == syncs[2], out.out
