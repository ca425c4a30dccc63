"""Reading an activation cache back as training batches: a seed-fixed shuffled order, resumable."""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sae_sweep.cache import ActivationCache
from sae_sweep.shards import to_torch

__all__ = ["ShuffledReader"]


class ShuffledReader:
    """Endless iterator of ``[batch_size, d_in]`` activation batches in a seed-fixed order.

    * Pool: every token position of the cache, minus special tokens when ``exclude_special``.
    * Epoch ``e`` visits the pool in the order of ``torch.randperm`` drawn from
      ``torch.Generator().manual_seed(seed * 1_000_003 + e)``; batch ``i`` is slice
      ``[i*B, (i+1)*B)`` of that permutation. The last partial batch of an epoch is DROPPED, so
      every batch has exactly ``batch_size`` rows and each position appears at most once per
      epoch (exactly once when the pool size is a multiple of ``batch_size``); a different
      permutation each epoch means different positions are dropped.
    * Within a batch, rows come in storage order (the batch's positions are sorted for fast
      memmap reads); the *set* of rows is what the permutation picks.
    * ``num_workers`` background threads read up to ``prefetch`` batches ahead (numpy releases
      the GIL while gathering, so reading overlaps training). Each prefetched batch is a
      fixed (epoch, batch) slot handed out strictly in order, so the output never depends on
      prefetching or thread timing. ``prefetch=0`` reads inline.
    * ``state_dict()`` records the position of the next batch the consumer gets (not of the
      prefetcher); ``load_state_dict()`` resumes with exactly the same subsequent batches.
    * On CUDA devices batches are pinned and copied with ``non_blocking=True``.
    """

    def __init__(
        self,
        cache: ActivationCache,
        batch_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        exclude_special: bool = True,
        dtype: torch.dtype = torch.float32,
        prefetch: int = 4,
        num_workers: int = 2,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.cache = cache
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.exclude_special = exclude_special
        self.dtype = dtype
        self.prefetch = max(0, int(prefetch))
        self.num_workers = max(1, int(num_workers))
        self.d_in = cache.d_in
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()

        # Global position p = seq * ctx + t; shard s holds positions [bounds[s], bounds[s+1]).
        ctx = cache.context_size
        self._flat = [a.reshape(-1, cache.d_in) for a in cache.shard_activations()]
        self._bounds = np.asarray(cache._seq_bounds, dtype=np.int64) * ctx
        pos_dtype = np.int32 if cache.n_tokens < 2**31 else np.int64
        if exclude_special and cache.n_special > 0:
            self._pool: np.ndarray | None = np.flatnonzero(
                ~cache.special_mask().reshape(-1)).astype(pos_dtype)
            self.n_positions = int(len(self._pool))
        else:
            self._pool = None  # identity: positions are 0 .. n_tokens - 1
            self.n_positions = cache.n_tokens
        self._perm_dtype = torch.int32 if self.n_positions < 2**31 else torch.int64
        if self.n_positions < self.batch_size:
            raise ValueError(
                f"activation cache {cache.key} has {self.n_positions} usable tokens, fewer than "
                f"batch_size={self.batch_size}; build a larger cache or lower the batch size"
            )
        self.batches_per_epoch = self.n_positions // self.batch_size

        self.epoch = 0
        self.batch_in_epoch = 0
        self._perms: dict[int, torch.Tensor] = {}  # epoch -> permutation (at most two kept)
        self._perm_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[tuple[int, int], Future]] = deque()
        self._next_slot = (0, 0)

    def _perm(self, epoch: int) -> torch.Tensor:
        with self._perm_lock:  # workers straddling an epoch boundary share one draw
            perm = self._perms.get(epoch)
            if perm is None:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.n_positions, generator=g, dtype=self._perm_dtype)
                self._perms[epoch] = perm
                for old in [e for e in self._perms if e < epoch - 1]:
                    del self._perms[old]
            return perm

    def positions(self, epoch: int, batch: int) -> np.ndarray:
        """Sorted global token positions (``seq * ctx + t``) of batch ``batch`` of ``epoch``."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} outside [0, {self.batches_per_epoch})")
        idx = self._perm(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size].numpy()
        pos = self._pool[idx] if self._pool is not None else idx
        return np.sort(pos.astype(np.int64, copy=False))

    def _read(self, pos: np.ndarray) -> torch.Tensor:
        # Fancy indexing with sorted rows touches each page of the memmap at most once
        # (measured faster than np.take(..., out=) here).
        if len(self._flat) == 1:
            raw = self._flat[0][pos]
        else:
            raw = np.empty((len(pos), self.d_in), dtype=self._flat[0].dtype)
            cuts = np.searchsorted(pos, self._bounds)  # pos is sorted: one run per shard
            for s, flat in enumerate(self._flat):
                lo, hi = cuts[s], cuts[s + 1]
                if lo < hi:
                    raw[lo:hi] = flat[pos[lo:hi] - self._bounds[s]]
        t = to_torch(raw, self.cache.storage_dtype, self.dtype)
        return t.pin_memory() if self._pin else t

    def batch(self, epoch: int, batch: int) -> torch.Tensor:
        """Batch ``batch`` of ``epoch`` on the CPU, without moving the iterator."""
        return self._read(self.positions(epoch, batch))

    def _advance(self, slot: tuple[int, int]) -> tuple[int, int]:
        e, b = slot
        return (e + 1, 0) if b + 1 == self.batches_per_epoch else (e, b + 1)

    def _fill(self) -> None:
        """Keep ``prefetch`` upcoming slots in flight, in order."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.num_workers, thread_name_prefix=f"shuffled-reader-{self.cache.key}")
            self._pending.clear()
            self._next_slot = (self.epoch, self.batch_in_epoch)
        while len(self._pending) < self.prefetch:
            slot = self._next_slot
            self._pending.append((slot, self._executor.submit(self.batch, *slot)))
            self._next_slot = self._advance(slot)

    def close(self, wait: bool = True) -> None:
        """Drop prefetched batches and stop the worker threads (they restart on demand)."""
        executor, self._executor = self._executor, None
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)

    def __del__(self):
        try:
            self.close(wait=False)  # may run in a worker thread, which cannot join itself
        except Exception:
            pass

    def __enter__(self) -> "ShuffledReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> "ShuffledReader":
        return self

    def __next__(self) -> torch.Tensor:
        slot = (self.epoch, self.batch_in_epoch)
        if self.prefetch == 0:
            x = self.batch(*slot)
        else:
            self._fill()
            got, fut = self._pending.popleft()
            assert got == slot, f"prefetch out of order: {got} != {slot}"
            try:
                x = fut.result()  # re-raises a worker's exception here
            except BaseException:
                self.close()
                raise
        self.epoch, self.batch_in_epoch = self._advance(slot)
        if self.prefetch:
            self._fill()  # start the replacement read before handing out this batch
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=self._pin)
        return x

    @property
    def tokens_seen(self) -> int:
        """Tokens handed out so far (including those before a resume)."""
        return (self.epoch * self.batches_per_epoch + self.batch_in_epoch) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch; JSON-able. Extra keys guard against a mismatched resume."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "batch_size": self.batch_size, "n_positions": self.n_positions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state`` (from ``state_dict``); the next batches equal those that followed."""
        for name, mine in (("seed", self.seed), ("batch_size", self.batch_size),
                           ("n_positions", self.n_positions)):
            if name in state and int(state[name]) != mine:
                raise ValueError(f"reader state has {name}={state[name]}, this reader has {mine}: "
                                 f"it cannot resume the same batch sequence")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"reader state epoch={epoch} batch_in_epoch={batch} is out of range "
                             f"(batches_per_epoch={self.batches_per_epoch})")
        self.close()
        self.epoch, self.batch_in_epoch = epoch, batch
