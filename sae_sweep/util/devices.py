"""Device facts the other modules share: fast fp32 matmuls on CUDA, and two instruments that make
GPU properties checkable on a CPU.

- ``fast_matmul(device)``: TF32 for fp32 matmuls where training runs on CUDA; returns what is in
  effect (``"tf32"`` / ``"ieee"``) for the run's tags.
- ``SyncOps``: a dispatch mode that records the ops which, on CUDA, make the host wait for the
  device (``.item()``/``bool()``/``float()`` of a tensor, ``nonzero``, boolean-mask indexing,
  ``unique``, ``bincount``, ``masked_select``, ``torch.tensor(data)`` uploads). On CPU nothing
  waits, but the same ops run, so a step that records none here will not sync there -- except
  through ``.tolist()`` and device copies, which do not pass through the dispatcher on CPU;
  ``cuda_syncs`` (``torch.cuda.set_sync_debug_mode``) is the real check on a GPU.
- ``LiveBytes``: peak bytes of the tensors allocated inside a block (any device, allocator
  independent): what a step or a backward needs beyond its inputs.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
import weakref
from collections import Counter
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def fast_matmul(device: Any) -> str:
    """On CUDA, let fp32 matmuls (and cuDNN convolutions) use TF32 tensor cores: ~8x the fp32
    throughput of an H100 with a 10-bit mantissa in the products (sums stay fp32). The planted-
    dictionary check of ``make gpu-check`` compares its quality with IEEE fp32. Returns the fp32
    matmul precision in effect on ``device`` ("tf32" or "ieee")."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "ieee"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# ops that make the host wait for a CUDA device (the ones sae_sweep can reach)
_SYNC_OPS = {
    "aten._local_scalar_dense": ".item() / bool() / int() / float() of a tensor",
    "aten.nonzero": "nonzero (output size depends on the data)",
    "aten.masked_select": "masked_select",
    "aten.bincount": "bincount (finds the max on the host)",
    "aten._unique2": "unique",
    "aten.unique_consecutive": "unique_consecutive",
    "aten.unique_dim": "unique",
    "aten._unique": "unique",
    "aten.repeat_interleave": "repeat_interleave without output_size",
    "aten.lift_fresh": "torch.tensor(host data): a blocking upload on CUDA",
    "aten.equal": "torch.equal",
    "aten.is_nonzero": "bool() of a tensor",
    "aten.allclose": "allclose",
}


def _bool_index(args: Any) -> bool:
    idx = args[1] if len(args) > 1 else None
    return isinstance(idx, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in idx)


class SyncOps(TorchDispatchMode):
    """Records host-syncing ops (see the module docstring) run inside the block, on any device.

    ``.ops``: Counter of (op description, innermost sae_sweep frame "file:line"), ``.count``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        why = _SYNC_OPS.get(name)
        if why is None and name in ("aten.index", "aten.index_put", "aten.index_put_") and _bool_index(args):
            why = "boolean-mask indexing"
        if name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is not None:
            why = None
        if why is not None:
            self.ops[(why, _where())] += 1
        return func(*args, **(kwargs or {}))

    def report(self) -> str:
        return "; ".join(f"{n}x {why} at {where}" for (why, where), n in self.ops.most_common()) or "none"


def _where() -> str:
    """The innermost sae_sweep frame of the current Python stack ("module/file.py:line")."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/sae_sweep/" in frame.filename and not frame.filename.endswith("devices.py"):
            return f"{frame.filename.split('/sae_sweep/')[-1]}:{frame.lineno}"
    return "?"


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the block and still alive, over the block.

    Counts every storage that an op creates (views and in-place results add nothing); a storage
    stops counting when it is freed. Independent of the allocator, the device and the machine.
    ``.peak``, ``.live``, ``.largest`` (bytes of the largest single storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._seen: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _strided(t)}
        for t in tree_leaves(out):
            if not _strided(t):  # sparse tensors: their index and value tensors are counted
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self._seen or key in inputs or st.nbytes() == 0:  # a view or an in-place result
                continue
            n = st.nbytes()
            self._seen[key] = n
            self.live += n
            self.largest = max(self.largest, n)
            weakref.finalize(st, self._free, key)
        self.peak = max(self.peak, self.live)
        return out


def _strided(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


@contextlib.contextmanager
def cuda_syncs(mode: str = "warn") -> Iterator[list[str]]:
    """Inside: ``torch.cuda.set_sync_debug_mode(mode)``; yields a list that collects, for every
    synchronizing CUDA call, where it came from (innermost sae_sweep frame and the message)."""
    found: list[str] = []
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if "synchroniz" in text.lower():
                found.append(f"{_where()}: {text.splitlines()[0][:120]}")
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(before)
            warnings.showwarning = show
