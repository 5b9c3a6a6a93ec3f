"""Counts host synchronisations on CPU, where there are none to see, by instrumenting what
would force one on a GPU: conversions of a tensor to a Python value or host array, and ops
whose output shape depends on the data (nonzero, masked_select, boolean indexing, unique …)."""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

CONVERSIONS = {
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
    torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
}
DATA_DEPENDENT = {
    torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select, torch.unique,
    torch.Tensor.unique, torch.unique_consecutive, torch.argwhere, torch.Tensor.argwhere,
}
# Host-side by design: torch.optim keeps AdamW's step counters on the host (not capturable/fused), and the
# data pipeline builds batches on the host before the one host-to-device copy.
HOST_SIDE = ("torch/optim/", "dcdit_cli/data/datasets.py")


def _is_bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter() as s: ...`` then ``s.total`` and ``s.where`` (func name → count)."""

    def __init__(self):
        super().__init__()
        self.where: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.where.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counted = func in CONVERSIONS or func in DATA_DEPENDENT
        if func is torch.Tensor.__getitem__ or func is torch.Tensor.__setitem__:
            counted = _is_bool_index(args)
        if func in (torch.where,) and len(args) == 1:
            counted = True
        if counted and not self._host_side():
            self.where[f"{getattr(func, '__qualname__', func)} @ {self._caller()}"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _frames():
        frame = sys._getframe(2)
        while frame is not None:
            yield frame
            frame = frame.f_back

    def _host_side(self) -> bool:
        return any(any(h in f.f_code.co_filename for h in HOST_SIDE) for f in self._frames())

    def _caller(self) -> str:
        for f in self._frames():
            name = f.f_code.co_filename
            if ("dcdit_cli" in name or "/tests/" in name or "/benchmarks/" in name) and not name.endswith("sync_counter.py"):
                return f"{name.split('/')[-1]}:{f.f_lineno}"
        return "?"
