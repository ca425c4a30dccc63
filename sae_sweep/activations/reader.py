"""Reading an activation cache back as training batches: a seed-fixed shuffled order, resumable."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sae_sweep.activations.cache import ActivationCache
from sae_sweep.activations.shards import storage, to_torch
from sae_sweep.config.job import SEED_LIMIT

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
    * On CUDA devices batches are pinned and copied with ``non_blocking=True`` in the cache's
      storage dtype (a bf16 cache moves half the bytes of fp32 over PCIe), and widened to ``dtype``
      on the device (exact: bf16 and fp16 are subsets of fp32). ``widen_on_device`` (default: on
      any device but the CPU) forces either way; ``batch``/``batch_at`` always give ``dtype`` on
      the CPU.
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
        widen_on_device: bool | None = None,
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
        self._wire = _wire_dtype(cache.storage_dtype, dtype, self.device, widen_on_device)

        # Global position p = seq * ctx + t; shard s holds positions [bounds[s], bounds[s+1]).
        ctx = cache.context_size
        self._flat = [a.reshape(-1, cache.d_in) for a in cache.shard_activations()]
        self._bounds = np.asarray(cache._seq_bounds, dtype=np.int64) * ctx
        pos_dtype = np.int32 if cache.n_tokens < 2**31 else np.int64
        if exclude_special and cache.n_special > 0:
            self._pool: np.ndarray | None = np.flatnonzero(~cache.special_mask().reshape(-1)).astype(pos_dtype)
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
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % SEED_LIMIT)
                perm = torch.randperm(self.n_positions, generator=g, dtype=self._perm_dtype)
                self._perms[epoch] = perm
                for old in [e for e in self._perms if e < epoch - 1]:
                    del self._perms[old]
            return perm

    def positions(self, epoch: int, batch: int) -> np.ndarray:
        """Sorted global token positions (``seq * ctx + t``) of batch ``batch`` of ``epoch``."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} outside [0, {self.batches_per_epoch})")
        idx = self._perm(epoch)[batch * self.batch_size : (batch + 1) * self.batch_size].numpy()
        pos = self._pool[idx] if self._pool is not None else idx
        return np.sort(pos.astype(np.int64, copy=False))

    def _read(self, pos: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
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
        t = to_torch(raw, self.cache.storage_dtype, dtype or self.dtype)
        return t.pin_memory() if self._pin and dtype is not None else t

    def batch(self, epoch: int, batch: int) -> torch.Tensor:
        """Batch ``batch`` of ``epoch`` on the CPU (in ``dtype``), without moving the iterator."""
        return self._read(self.positions(epoch, batch))

    def _fetch(self, epoch: int, batch: int) -> torch.Tensor:
        """A batch as it travels to the device (pinned, in the transfer dtype)."""
        return self._read(self.positions(epoch, batch), self._wire)

    def batch_at(self, step: int) -> torch.Tensor:
        """The batch handed out at 0-based ``step`` (CPU), without moving the iterator."""
        return self.batch(*divmod(step, self.batches_per_epoch))

    def _advance(self, slot: tuple[int, int]) -> tuple[int, int]:
        e, b = slot
        return (e + 1, 0) if b + 1 == self.batches_per_epoch else (e, b + 1)

    def _fill(self) -> None:
        """Keep ``prefetch`` upcoming slots in flight, in order."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.num_workers, thread_name_prefix=f"shuffled-reader-{self.cache.key}"
            )
            self._pending.clear()
            self._next_slot = (self.epoch, self.batch_in_epoch)
        while len(self._pending) < self.prefetch:
            slot = self._next_slot
            self._pending.append((slot, self._executor.submit(self._fetch, *slot)))
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

    def __enter__(self) -> ShuffledReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> ShuffledReader:
        return self

    def __next__(self) -> torch.Tensor:
        slot = (self.epoch, self.batch_in_epoch)
        if self.prefetch == 0:
            x = self._fetch(*slot)
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
        return _to_device(x, self.device, self.dtype, self._pin)

    @property
    def tokens_seen(self) -> int:
        """Tokens handed out so far (including those before a resume)."""
        return (self.epoch * self.batches_per_epoch + self.batch_in_epoch) * self.batch_size

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch; JSON-able. Extra keys guard against a mismatched resume."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "n_positions": self.n_positions,
            "cache_key": self.cache.key,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state`` (from ``state_dict``); the next batches equal those that followed."""
        _check_same_cache(state, self.cache.key)
        for name, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("n_positions", self.n_positions)):
            if name in state and int(state[name]) != mine:
                raise ValueError(
                    f"reader state has {name}={state[name]}, this reader has {mine}: "
                    f"it cannot resume the same batch sequence"
                )
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(
                f"reader state epoch={epoch} batch_in_epoch={batch} is out of range "
                f"(batches_per_epoch={self.batches_per_epoch})"
            )
        self.close()
        self.epoch, self.batch_in_epoch = epoch, batch


def _check_same_cache(state: Mapping[str, Any], key: str) -> None:
    """A checkpoint's reader position belongs to the cache it read: resuming it over another cache
    (other LM weights, data or settings, hence another key) would mix two runs' data."""
    saved = state.get("cache_key")  # checkpoints written before this check have none
    if saved is not None and saved != key:
        raise ValueError(
            f"reader state was saved reading activation cache {saved}, this reader reads {key} (other LM "
            f"weights, data or settings): it cannot resume that run; delete the run's checkpoints to train it "
            f"from the start"
        )


def _wire_dtype(
    storage_dtype: str, dtype: torch.dtype, device: torch.device, widen_on_device: bool | None
) -> torch.dtype:
    """The dtype a batch crosses to its device in: the storage dtype when it widens exactly to
    ``dtype`` there (and the device is not the CPU, unless forced), else ``dtype``."""
    if widen_on_device is None:
        widen_on_device = device.type != "cpu"
    narrow = storage(storage_dtype)[0]
    exact = narrow in (torch.bfloat16, torch.float16) and dtype == torch.float32
    return narrow if widen_on_device and exact else dtype


def _to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A host batch (pinned when ``pinned``) onto ``device`` (asynchronously when pinned), then
    widened to ``dtype`` there."""
    if device.type != "cpu":
        x = x.to(device, non_blocking=pinned)
    return x.to(dtype)


class DiskBlocks:
    """An activation cache as consecutive blocks of ``block_rows`` token positions, each read with
    one large sequential read (instead of per-row gathers over the whole cache) and kept in its
    storage dtype; BOS/EOS/PAD positions are left out."""

    def __init__(self, cache: ActivationCache, block_rows: int, exclude_special: bool = True):
        self.cache, self.block_rows, self.d_in = cache, int(block_rows), cache.d_in
        self._flat = [a.reshape(-1, cache.d_in) for a in cache.shard_activations()]
        self._bounds = np.asarray(cache._seq_bounds, dtype=np.int64) * cache.context_size
        self.n_tokens = cache.n_tokens
        self.n_blocks = -(-self.n_tokens // self.block_rows)
        self._keep = ~cache.special_mask().reshape(-1) if exclude_special and cache.n_special else None
        self.valid = np.array(
            [
                self._slice_keep(b).sum() if self._keep is not None else self._span(b)[1] - self._span(b)[0]
                for b in range(self.n_blocks)
            ],
            dtype=np.int64,
        )

    def _span(self, b: int) -> tuple[int, int]:
        return b * self.block_rows, min(self.n_tokens, (b + 1) * self.block_rows)

    def _slice_keep(self, b: int) -> np.ndarray:
        assert self._keep is not None  # only called when special positions are left out
        lo, hi = self._span(b)
        return self._keep[lo:hi]

    def block(self, b: int) -> np.ndarray:
        """Raw rows (storage dtype) of block ``b``, special positions removed."""
        lo, hi = self._span(b)
        parts = []
        for s, flat in enumerate(self._flat):  # a block may straddle a shard boundary
            a, z = max(lo, self._bounds[s]), min(hi, self._bounds[s + 1])
            if a < z:
                parts.append(np.asarray(flat[a - self._bounds[s] : z - self._bounds[s]]))
        raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return raw[self._slice_keep(b)] if self._keep is not None else raw

    def decode(self, raw: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return to_torch(np.ascontiguousarray(raw), self.cache.storage_dtype, dtype)


class BlockReader:
    """Endless iterator of ``[batch_size, d_in]`` batches in a seed-fixed, block-shuffled order,
    with large sequential reads: epoch ``e`` visits the source's blocks in a permutation drawn from
    ``(seed, e)`` and each block's rows in a permutation drawn from ``(seed, e, block)``; batch j of
    a block is rows ``[j*B, (j+1)*B)`` of that permutation, and a block's last partial batch is
    dropped. The next block is read on a background thread while this one is trained on. The
    order depends only on the seed and the cache, never on timing; ``state_dict()`` /
    ``load_state_dict()`` resume exactly. (``ShuffledReader`` is the random-gather alternative:
    one global permutation, a read per row.)"""

    def __init__(
        self,
        source: DiskBlocks,
        batch_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        prefetch: bool = True,
        widen_on_device: bool | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.device, self.dtype, self.prefetch = torch.device(device), dtype, prefetch
        self.d_in = source.d_in
        self.per_block = source.valid // self.batch_size
        self.batches_per_epoch = int(self.per_block.sum())
        self.n_positions = int(source.valid.sum())
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"activation cache {source.cache.key}: no block of {source.block_rows} positions holds "
                f"batch_size={self.batch_size} usable tokens; lower the batch size or raise cache.block_tokens"
            )
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._wire = _wire_dtype(source.cache.storage_dtype, dtype, self.device, widen_on_device)
        self._lock = threading.Lock()
        self._orders: dict[int, np.ndarray] = {}
        self.epoch = self.block_pos = self.batch_in_block = 0
        self._current: tuple[tuple[int, int], np.ndarray, torch.Tensor] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._next: tuple[tuple[int, int], Future] | None = None
        self._skip_empty()

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:  # the prefetch thread asks too
            order = self._orders.get(epoch)
            if order is None:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % SEED_LIMIT)
                order = self._orders[epoch] = torch.randperm(self.source.n_blocks, generator=g).numpy()
                for old in [e for e in self._orders if e < epoch - 1]:
                    del self._orders[old]
            return order

    def _block_id(self, epoch: int, pos: int) -> int:
        return int(self._order(epoch)[pos])

    def _rows_perm(self, epoch: int, block: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + block) % SEED_LIMIT)
        return torch.randperm(n, generator=g)

    def _skip_empty(self) -> None:
        """Move past blocks too small for one batch (and past the end of an epoch)."""
        while True:
            if self.block_pos >= self.source.n_blocks:
                self.epoch, self.block_pos, self.batch_in_block = self.epoch + 1, 0, 0
            if self.per_block[self._block_id(self.epoch, self.block_pos)] > self.batch_in_block:
                return
            self.block_pos, self.batch_in_block = self.block_pos + 1, 0

    def _load(self, slot: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor]:
        epoch, pos = slot
        b = self._block_id(epoch, pos)
        raw = self.source.block(b)
        return raw, self._rows_perm(epoch, b, len(raw))

    def _following(self, slot: tuple[int, int]) -> tuple[int, int]:
        epoch, pos = slot
        while True:
            pos += 1
            if pos >= self.source.n_blocks:
                epoch, pos = epoch + 1, 0
            if self.per_block[self._block_id(epoch, pos)] > 0:
                return epoch, pos

    def _block(self) -> tuple[np.ndarray, torch.Tensor]:
        slot = (self.epoch, self.block_pos)
        if self._current is not None and self._current[0] == slot:
            return self._current[1], self._current[2]
        if self._next is not None and self._next[0] == slot:
            raw, perm = self._next[1].result()
        else:
            raw, perm = self._load(slot)
        self._current = (slot, raw, perm)
        if self.prefetch:  # read the block after this one while this one is trained on
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="block-reader")
            nxt = self._following(slot)
            self._next = (nxt, self._executor.submit(self._load, nxt))
        return raw, perm

    def __iter__(self) -> BlockReader:
        return self

    def __next__(self) -> torch.Tensor:
        raw, perm = self._block()
        rows = perm[self.batch_in_block * self.batch_size : (self.batch_in_block + 1) * self.batch_size]
        x = self.source.decode(raw[np.sort(rows.numpy())], self._wire)
        self.batch_in_block += 1
        self._skip_empty()
        return _to_device(x.pin_memory() if self._pin else x, self.device, self.dtype, self._pin)

    def batch_at(self, step: int) -> torch.Tensor:
        """The batch handed out at 0-based ``step`` (CPU), without moving the iterator."""
        epoch, rest = divmod(step, self.batches_per_epoch)
        order = self._order(epoch)
        for b in order:
            if rest < self.per_block[b]:
                raw = self.source.block(int(b))
                rows = self._rows_perm(epoch, int(b), len(raw))[rest * self.batch_size : (rest + 1) * self.batch_size]
                return self.source.decode(raw[np.sort(rows.numpy())], self.dtype)
            rest -= self.per_block[b]
        raise IndexError(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "block_pos": self.block_pos,
            "batch_in_block": self.batch_in_block,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "block_rows": self.source.block_rows,
            "n_positions": self.n_positions,
            "cache_key": self.source.cache.key,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_same_cache(state, self.source.cache.key)
        for name, mine in (
            ("seed", self.seed),
            ("batch_size", self.batch_size),
            ("block_rows", self.source.block_rows),
            ("n_positions", self.n_positions),
        ):
            if name in state and int(state[name]) != mine:
                raise ValueError(
                    f"reader state has {name}={state[name]}, this reader has {mine}: "
                    f"it cannot resume the same batch sequence"
                )
        self.epoch, self.block_pos, self.batch_in_block = (
            int(state["epoch"]),
            int(state["block_pos"]),
            int(state["batch_in_block"]),
        )
        self._current = self._next = None
        self._skip_empty()

    def close(self, wait: bool = True) -> None:
        executor, self._executor = self._executor, None
        self._next = None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
