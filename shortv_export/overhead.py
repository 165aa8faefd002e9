"""Counting what a forward dispatches, without timing it: aten operations per decoder layer, and host syncs
(``aten::_local_scalar_dense``: ``.item()``, ``int(tensor)``, ``bool(tensor)``) per forward. On a GPU each
operation is a kernel launch and each sync stalls the CPU's queue, so these counts are the CPU-measurable proxy
for a launch-bound (batch 1) prefill. Used by ``tests/test_overhead.py`` and ``scripts/bench_prefill.py``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class Dispatched:
    ops: Counter  # aten op name -> count, whole forward
    per_layer: dict[int, int]  # decoder layer -> ops dispatched inside it

    @property
    def syncs(self) -> int:
        return self.ops["_local_scalar_dense"]


class _Counter(TorchDispatchMode):
    def __init__(self, layers):
        super().__init__()
        self.result = Dispatched(Counter(), {})
        self.layer = None
        self.hooks = []
        for i, layer in enumerate(layers):
            self.hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "layer", i)))
            self.hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(self, "layer", None)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.result.ops[func.overloadpacket.__name__] += 1
        if self.layer is not None:
            self.result.per_layer[self.layer] = self.result.per_layer.get(self.layer, 0) + 1
        return func(*args, **(kwargs or {}))


def dispatched(model, inputs: dict, frozen: list[int], **forward_kwargs) -> Dispatched:
    """What one ``model(**inputs)`` dispatches with ``frozen`` as its ShortV layers ([] = the stock path in every
    layer); ``model.model.shortv_layers`` is restored afterwards."""
    saved = list(model.model.shortv_layers)
    model.model.shortv_layers = list(frozen)
    counter = _Counter(model.model.language_model.layers)
    try:
        with torch.no_grad(), counter:
            model(**inputs, **forward_kwargs)
    finally:
        model.model.shortv_layers = saved
        for hook in counter.hooks:
            hook.remove()
    return counter.result
