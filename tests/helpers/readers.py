"""In-memory readers with the activation readers' protocol (iterator + state_dict /
load_state_dict) for driving the training loop without a cache."""

from __future__ import annotations

import torch


class TensorReader:
    """Endless shuffled batches over a tensor with the ShuffledReader protocol (state_dict)."""

    def __init__(self, data, batch_size, seed=0):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._make_perm()

    def _make_perm(self):
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos + self.batch_size > len(self.data):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make_perm()
        idx = self._perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.data[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._make_perm()


class ListReader(TensorReader):
    """A finite reader: raises StopIteration after `n` batches."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __next__(self):
        if self.i >= len(self.batches):
            raise StopIteration
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]
