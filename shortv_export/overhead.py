"""Counting what a forward dispatches, without timing it: aten operations per decoder layer, kernels, and host
syncs per forward. On a GPU each operation that computes something is a kernel launch and each sync stalls the
CPU's queue, so these counts are the CPU-measurable proxy for a launch-bound (batch 1) prefill. Used by
``tests/test_overhead.py`` and ``scripts/bench_prefill.py``.

Kernels: operations other than views and bare allocations. Host syncs: the operations that, seen from the CPU,
make the CPU wait for the GPU on CUDA: value reads (``.item()``, ``int(tensor)``, ``bool(tensor)``:
``aten::_local_scalar_dense``), results whose shape depends on values (``nonzero``, ``masked_select``, boolean
indexing, ``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``, ``equal``), and non-empty tensors
made from host data inside the forward (``torch.tensor(...)``: ``aten::lift_fresh``, then a blocking host-to-device
copy). Not seen on a CPU: copies to the host (``.tolist()``, ``.cpu()``) and moves of existing host tensors to the
device; neither ShortV's code nor the counts rely on them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "bincount",
        "equal",
    }
)
HOST_DATA = "lift_fresh"  # torch.tensor(python data): on CUDA a blocking host-to-device copy
NOT_KERNELS = frozenset({"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


def _syncs(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNCING:
        return True
    if name == HOST_DATA:  # an empty one moves nothing
        return args[0].numel() > 0
    if name == "repeat_interleave":  # the output length is read back unless given
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_") and len(args) > 1:  # boolean indexing: a nonzero inside
        masks = any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1])
        # one boolean mask set to a single value is a masked_fill (no sync)
        fill = name != "index" and len(args[1]) == 1 and args[2].numel() == 1
        return masks and not fill
    return False


@dataclass
class Dispatched:
    ops: Counter  # aten op name -> count, whole forward
    per_layer: dict[int, int]  # decoder layer -> ops dispatched inside it
    kernels_per_layer: dict[int, int]  # decoder layer -> ops that are kernels (not views or bare allocations)
    sync_ops: Counter  # op name -> count, of the ops that make the CPU wait for the device on CUDA
    kernels: int = 0  # ops that are kernels, whole forward

    @property
    def syncs(self) -> int:
        return sum(self.sync_ops.values())


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
        name = func.overloadpacket.__name__
        kernel = not func.is_view and name not in NOT_KERNELS
        result.ops[name] += 1
        result.kernels += kernel
        if _syncs(func, args, kwargs or {}):
            result.sync_ops[name] += 1
        if self.layer is not None:
            result.per_layer[self.layer] = result.per_layer.get(self.layer, 0) + 1
            result.kernels_per_layer[self.layer] = result.kernels_per_layer.get(self.layer, 0) + kernel
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
