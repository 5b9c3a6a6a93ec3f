"""Counts host synchronisations on CPU, where there are none to see, by instrumenting what
would force one on a GPU: conversions of a tensor to a Python value or host array, and ops
whose output shape depends on the data (nonzero, masked_select, boolean indexing, unique …).

It also counts host-to-device copies from pageable memory (``copies``): on a GPU each is a
``cudaMemcpy`` from pageable host memory, which waits for the device's queue. On CPU there is no
device to copy to, so the counter counts what would copy on a GPU: a tensor built from host data
(Python numbers, lists, arrays) on a named device (``torch.tensor``, ``as_tensor``, ``asarray``
with ``device=``, whatever device that is, since the code is the same on every device; and
``x.new_tensor``, on x's device), and a ``.to(device)`` or ``.cuda()`` called from the project's code
(dcdit_cli, tests, benchmarks: torch's own helpers move tensors already on the device). The pinned,
non-blocking path ``diffusion.gaussian.to_device`` is the one allowed way. Fills with a Python
scalar (``torch.full``, ``x * 0.5``, ``torch.where(m, x, 1.0)``) pass the value as a kernel argument
and are not copies; neither is a host tensor built without a device (until it is moved)."""

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
# Host-side functions in modules that also run device code: multi-budget training draws each step's
# fraction from a host generator (training/loop.py), a Python float that never was on the device.
HOST_FUNCTIONS = ("budget_for_step",)
FROM_HOST_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}
PINNED_PATH = "to_device"  # dcdit_cli/diffusion/gaussian.py: pinned memory, non_blocking=True
PROJECT = ("dcdit_cli", "/tests/", "/benchmarks/")


def _copies_from_host(func, args, kwargs) -> bool:
    """Whether the call would copy host memory to a device on a GPU (see the module docstring)."""
    if func in FROM_HOST_DATA:
        return not isinstance(args[0], torch.Tensor) and kwargs.get("device") is not None
    if func is torch.Tensor.new_tensor:
        return not isinstance(args[1], torch.Tensor)
    if func is torch.Tensor.cuda:
        return True
    if func is torch.Tensor.to:  # a device named (not only a dtype)
        return "device" in kwargs or any(isinstance(a, (str, int, torch.device, torch.Tensor)) for a in args[1:])
    return False


def _is_bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter() as s: ...`` then ``s.total`` and ``s.where`` (func name → count)."""

    def __init__(self):
        super().__init__()
        self.where: Counter = Counter()
        self.copies: Counter = Counter()  # host-to-device copies from pageable memory, by call site

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
        copied = _copies_from_host(func, args, kwargs) and (func not in MOVES or self._called_from_project())
        if (counted or copied) and not self._host_side():
            site = f"{getattr(func, '__qualname__', func)} @ {self._caller()}"
            if counted:
                self.where[site] += 1
            elif not self._pinned_path():
                self.copies[site] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _frames():
        frame = sys._getframe(2)
        while frame is not None:
            yield frame
            frame = frame.f_back

    def _host_side(self) -> bool:
        return any(any(h in f.f_code.co_filename for h in HOST_SIDE) or f.f_code.co_name in HOST_FUNCTIONS
                   for f in self._frames())

    def _called_from_project(self) -> bool:
        name = sys._getframe(2).f_code.co_filename  # the frame that called torch
        return any(p in name for p in PROJECT)

    def _pinned_path(self) -> bool:
        return any(f.f_code.co_name == PINNED_PATH and f.f_code.co_filename.endswith("gaussian.py") for f in self._frames())

    def _caller(self) -> str:
        for f in self._frames():
            name = f.f_code.co_filename
            if any(p in name for p in PROJECT) and not name.endswith("sync_counter.py"):
                return f"{name.split('/')[-1]}:{f.f_lineno}"
        return "?"
