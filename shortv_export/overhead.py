"""Counting what a forward dispatches, without timing it: aten operations per decoder layer, and host syncs per
forward. On a GPU each operation is a kernel launch (views excepted) and each sync stalls the CPU's queue, so these
counts are the CPU-measurable proxy for a launch-bound (batch 1) prefill. Used by ``tests/test_overhead.py`` and
``scripts/bench_prefill.py``.

A host sync is an operation that, on CUDA, makes the CPU wait for the GPU: reading a value (``.item()``,
``int(tensor)``, ``bool(tensor)``: ``aten::_local_scalar_dense``), a result whose shape depends on values
(``nonzero``, ``masked_select``, boolean indexing, ``unique``), or a tensor made from host data inside the forward
(``torch.tensor(...)``: ``aten::lift_fresh``, then a blocking host-to-device copy). On the CPU none of them costs
anything, which is why they are counted rather than timed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive"}
)
HOST_DATA = "lift_fresh"  # torch.tensor(python data): on CUDA a blocking host-to-device copy


def _syncs(func, args) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNCING:
        return True
    if name == HOST_DATA:  # an empty one moves nothing
        return args[0].numel() > 0
    if name in ("index", "index_put", "index_put_") and len(args) > 1:  # boolean indexing: a nonzero inside
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1])
    return False


@dataclass
class Dispatched:
    ops: Counter  # aten op name -> count, whole forward
    per_layer: dict[int, int]  # decoder layer -> ops dispatched inside it
    kernels_per_layer: dict[int, int]  # decoder layer -> ops that are not views (a kernel launch each on a GPU)
    sync_ops: Counter  # op name -> count, of the ops that make the CPU wait for the device on CUDA
    kernels: int = 0  # ops that are not views, whole forward

    @property
    def syncs(self) -> int:
        return sum(self.sync_ops.values())

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class _Counter(TorchDispatchMode):
    def __init__(self, layers):
        super().__init__()
        self.result = Dispatched(Counter(), {}, {}, Counter())
        self.layer = None
        self.hooks = []
        for i, layer in enumerate(layers):
            self.hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "layer", i)))
            self.hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(self, "layer", None)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = self.result
        result.ops[func.overloadpacket.__name__] += 1
        result.kernels += not func.is_view
        if _syncs(func, args):
            result.sync_ops[func.overloadpacket.__name__] += 1
        if self.layer is not None:
            result.per_layer[self.layer] = result.per_layer.get(self.layer, 0) + 1
            if not func.is_view:
                result.kernels_per_layer[self.layer] = result.kernels_per_layer.get(self.layer, 0) + 1
        return func(*args, **(kwargs or {}))


def dispatched(model, inputs: dict, frozen: list[int], **forward_kwargs) -> Dispatched:
    """What one ``model(**inputs)`` dispatches with ``frozen`` as its ShortV layers ([] = the stock path in every
    layer); ``model.model.shortv_layers`` is restored afterwards."""
    saved = list(model.model.shortv_layers)
    model.model.shortv_layers = list(frozen)
    counter = _Counter(model.model.shortv_text_model().layers)
    try:
        with torch.no_grad(), counter:
            model(**inputs, **forward_kwargs)
    finally:
        model.model.shortv_layers = saved
        for hook in counter.hooks:
            hook.remove()
    return counter.result
