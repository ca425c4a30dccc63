"""Activations streamed from the LM (``cache.mode=stream``): LM forward -> a shuffling buffer in
memory -> SAE batches, nothing on disk, as SAELens's ActivationsStore and sparsify do.

The stream is cut into blocks of ``block_windows`` windows (the windows ``token_windows`` would
give, in the same order). A block's activations are computed once and kept while any seed still
reads it, so every SAE of a packed job -- whatever its seed -- is fed by one LM pass; each seed
draws its own permutation of each block. A reader's position (block, batch in block) is all a
checkpoint needs: a requeued job tokenizes past the blocks it trained on (no LM work) and
recomputes the block it was in, which gives the same activations, so resuming is bit-identical
on CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from sae_sweep.config.job import SEED_LIMIT

__all__ = ["StreamBlocks", "StreamReader"]


class StreamBlocks:
    """Blocks of LM activations over a window stream; the last ``keep`` blocks stay in memory."""

    def __init__(
        self,
        lm: Any,
        windows: Callable[[], Iterator[torch.Tensor]],
        layer: int,
        hook: str,
        block_windows: int,
        forward_batch: int = 32,
        keep: int = 2,
    ):
        self.lm, self.windows, self.layer, self.hook = lm, windows, int(layer), hook
        self.block_windows, self.forward_batch, self.keep = int(block_windows), int(forward_batch), int(keep)
        self.d_in = lm.d_model
        self.forward_tokens = 0  # LM forward work done, in tokens (a block recomputed counts again)
        self._special = torch.tensor(sorted(lm.special_token_ids), dtype=torch.long)
        self._blocks: OrderedDict[int, Optional[torch.Tensor]] = OrderedDict()
        self._iter: Optional[Iterator[torch.Tensor]] = None
        self._pending = torch.zeros(0, 0, dtype=torch.long)  # windows read but not in a block yet
        self._next_block = 0  # the block the window iterator is at

    def _restart(self) -> None:
        self._iter, self._next_block = self.windows(), 0
        self._pending = torch.zeros(0, 0, dtype=torch.long)

    def _take_windows(self, n: int) -> Optional[torch.Tensor]:
        """The next ``n`` windows of the stream (fewer at its end; None when it has ended)."""
        assert self._iter is not None, "block() restarts the window iterator first"
        parts, have = ([self._pending] if self._pending.numel() else []), len(self._pending)
        while have < n:
            try:
                chunk = next(self._iter)
            except StopIteration:
                break
            parts.append(chunk)
            have += len(chunk)
        if not parts:
            return None
        allw = torch.cat(parts) if len(parts) > 1 else parts[0]
        self._pending = allw[n:]
        return allw[:n]

    def block(self, b: int) -> Optional[torch.Tensor]:
        """Activations ``[n, d_in]`` (LM dtype and device, BOS/EOS/PAD rows removed) of block ``b``;
        None past the end of the stream."""
        if b in self._blocks:
            self._blocks.move_to_end(b)
            return self._blocks[b]
        if self._iter is None or b < self._next_block:
            self._restart()
        while self._next_block < b:  # tokenize past earlier blocks: no LM work
            if self._take_windows(self.block_windows) is None:
                return None
            self._next_block += 1
        ids = self._take_windows(self.block_windows)
        self._next_block += 1
        rows = None if ids is None or len(ids) == 0 else self._activations(ids)
        self._blocks[b] = rows
        while len(self._blocks) > self.keep:
            self._blocks.popitem(last=False)
        return rows

    @torch.no_grad()
    def _activations(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ~torch.isin(ids, self._special)
        out = []
        for i in range(0, len(ids), self.forward_batch):
            chunk = ids[i : i + self.forward_batch]
            acts = self.lm.activations(chunk.to(self.lm.device), self.layer, self.hook)
            out.append(acts[keep[i : i + self.forward_batch].to(acts.device)])
            self.forward_tokens += chunk.numel()
        rows = torch.cat(out)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(f"the LM's activations at layer {self.layer} ({self.hook}) hold NaN/inf")
        return rows


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor goes to CUDA from pinned memory without blocking the host
    (a pageable copy would wait for the device: a sync per batch)."""
    if t.device == device or device.type == "cpu":
        return t.to(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class StreamReader:
    """Batches of one seed from a ``StreamBlocks``: blocks in stream order (one pass), each block's
    rows in a permutation drawn from ``(seed, block)``; batch j of a block is rows ``[j*B, (j+1)*B)``
    of it, and its last partial batch is dropped. StopIteration when the stream ends."""

    def __init__(
        self,
        source: StreamBlocks,
        batch_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.device, self.dtype, self.d_in = torch.device(device), dtype, source.d_in
        self.block_pos = self.batch_in_block = 0

    def _perm(self, b: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + b) % SEED_LIMIT)
        return torch.randperm(n, generator=g)

    def __iter__(self) -> StreamReader:
        return self

    def _rows(self, b: int, j: int) -> Optional[torch.Tensor]:
        rows = self.source.block(b)
        if rows is None:
            raise StopIteration
        if (j + 1) * self.batch_size > len(rows):
            return None  # past this block's last whole batch
        pick = self._perm(b, len(rows))[j * self.batch_size : (j + 1) * self.batch_size].sort().values
        return rows[_upload(pick, rows.device)]

    def __next__(self) -> torch.Tensor:
        while True:
            x = self._rows(self.block_pos, self.batch_in_block)
            if x is not None:
                self.batch_in_block += 1
                # in the LM's dtype to the training device (a no-op when the LM is there), widened there
                return _upload(x, self.device).to(self.dtype)
            self.block_pos, self.batch_in_block = self.block_pos + 1, 0

    def batch_at(self, step: int) -> torch.Tensor:
        """The batch handed out at 0-based ``step`` (recomputes blocks if needed)."""
        b, j = 0, step
        while True:
            rows = self.source.block(b)
            if rows is None:
                raise IndexError(step)
            per = len(rows) // self.batch_size
            if j < per:
                x = self._rows(b, j)
                assert x is not None  # j is one of the block's whole batches
                return x.to("cpu", self.dtype)
            b, j = b + 1, j - per

    def state_dict(self) -> dict[str, int]:
        return {
            "block_pos": self.block_pos,
            "batch_in_block": self.batch_in_block,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "block_windows": self.source.block_windows,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, mine in (
            ("seed", self.seed),
            ("batch_size", self.batch_size),
            ("block_windows", self.source.block_windows),
        ):
            if name in state and int(state[name]) != mine:
                raise ValueError(
                    f"reader state has {name}={state[name]}, this reader has {mine}: "
                    f"it cannot resume the same batch sequence"
                )
        self.block_pos, self.batch_in_block = int(state["block_pos"]), int(state["batch_in_block"])

    def close(self, wait: bool = True) -> None:
        pass
