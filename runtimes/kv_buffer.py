"""A KV cache that the graph updates in place: one host buffer per past/present pair, with spare
capacity, bound as both `past_key_values.{i}.*` and `present.{i}.*` (a graph whose manifest entry
says `kv_shared_buffer`). The attention op then writes only the new positions; without this, every
step copies the whole cache into a new `present` tensor (GPT-2-124M at context 512: 2 x 37.7 MB a
step; attention of 12 layers 11.2 -> 4.3 ms a step on one thread, measured, docs/performance.md).
numpy and onnxruntime only. Shapes: B batch, nkv KV heads, C capacity, P valid positions, hs head size.
"""

from __future__ import annotations

import numpy as np
from onnxruntime.capi import _pybind_state as C

ALIGN = 64  # capacities are multiples of this many positions


def capacity_for(need: int, limit: int) -> int:
    """Room for `need` positions and half as many again (at least 64 more), up to the model's
    context `limit` (never below `need`): a growth copies the cache, so it must be rare."""
    room = need + max(ALIGN, need // 2)
    return max(need, min(-(-room // ALIGN) * ALIGN, limit))


class KVBuffers:
    """The buffers and the OrtValues that wrap them (no copy: onnxruntime writes into the numpy memory)."""

    def __init__(self, names: int, kv_heads: int, head_dim: int, dtype: np.dtype, limit: int, device):
        self._n, self._kvh, self._hs, self._dtype, self._limit, self._device = names, kv_heads, head_dim, dtype, limit, device
        self.arrays: list[np.ndarray] = []  # (B, nkv, C, hs) each, in past-name order
        self.values: list = []  # C-level OrtValues over `arrays`

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2] if self.arrays else 0

    def allocate(self, batch: int, need: int) -> None:
        """Fresh, zeroed buffers for `batch` rows and at least `need` positions."""
        shape = (batch, self._kvh, capacity_for(need, self._limit), self._hs)
        self._wrap([np.zeros(shape, self._dtype) for _ in range(self._n)])

    def ensure(self, valid: int) -> bool:
        """Grow (keeping the first `valid` positions) when position `valid` does not fit; True if it grew."""
        if valid < self.capacity:
            return False
        self.put([a[:, :, :valid] for a in self.arrays])
        return True

    def take(self, valid: int) -> list[np.ndarray]:
        """Host copies of the first `valid` positions: (B, nkv, P, hs) each."""
        return [np.ascontiguousarray(a[:, :, :valid]) for a in self.arrays]

    def put(self, arrays: list[np.ndarray]) -> None:
        """Copy `arrays` (B, nkv, P, hs) into fresh buffers with room to decode."""
        B, _, valid, _ = arrays[0].shape
        self.allocate(B, valid + 1)
        for dst, src in zip(self.arrays, arrays):
            dst[:, :, :valid] = src

    def clear(self) -> None:
        self.arrays, self.values = [], []

    def _wrap(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.values = [C.OrtValue.ortvalue_from_numpy(a, self._device) for a in arrays]


__all__ = ["KVBuffers", "capacity_for"]
