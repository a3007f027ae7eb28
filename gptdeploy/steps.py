"""The one step loop: a left-padded prefill, then decode steps that carry the KV cache forward.

A fixed batch driven step by step goes through `Steps`: parity, the quantized-graph agreement
checks, held-out perplexity and the bench worker. Left padding and position ids are made here,
once (`left_pad`, `positions`; the batching engine, gptdeploy/engine, prefills its joiners with
them); the runtime turns each step's `present.*` into the next step's `past_key_values.*`.
Shapes: B batch, L longest prompt, S positions so far (prompt + fed tokens), N room reserved.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gptdeploy.errors import GenerationError
from gptdeploy.runtimes.base import RuntimeBase, StepOutput


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) ids and mask, shorter prompts padded on the left."""
    L = max(len(p) for p in prompts)
    ids = np.full((len(prompts), L), pad_id, dtype=np.int64)  # (B, L)
    mask = np.zeros((len(prompts), L), dtype=np.int64)  # (B, L)
    for r, p in enumerate(prompts):
        ids[r, L - len(p) :] = p
        mask[r, L - len(p) :] = 1
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids from a left-padded mask: 0 at each row's first real token (pads clipped to 0)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


class Steps:
    """One batch's chain over one runtime: `prefill()` once, then `decode(next_ids)` per token.

    The ids and mask of every position fed so far are kept (`ids`, `mask`), in buffers with room
    for `room` tokens after the prompt (grown if exceeded), so a step allocates nothing.
    """

    def __init__(self, runtime: RuntimeBase, prompts: Sequence[Sequence[int]], pad_id: int, room: int = 64):
        if not prompts or not all(len(p) for p in prompts):
            raise GenerationError("every prompt needs at least one token id")
        self.runtime = runtime
        ids, mask = left_pad(prompts, pad_id)
        B, L = ids.shape
        self.lengths = np.array([len(p) for p in prompts])  # (B,)
        self.pads = L - self.lengths  # (B,) left padding per row
        self._ids = np.zeros((B, L + room), dtype=np.int64)  # (B, L+N)
        self._mask = np.zeros((B, L + room), dtype=np.int64)  # (B, L+N)
        self._ids[:, :L], self._mask[:, :L] = ids, mask
        self._prompt_positions = positions(mask)  # (B, L)
        self._next_pos = self._prompt_positions[:, -1:] + 1  # (B, 1)
        self.size = 0  # positions fed to the runtime so far (S)
        self._L = L

    @property
    def batch(self) -> int:
        return self._ids.shape[0]

    @property
    def ids(self) -> np.ndarray:
        """(B, S) every id fed so far, left padding included."""
        return self._ids[:, : self.size]

    @property
    def mask(self) -> np.ndarray:
        """(B, S) 1 for real tokens, 0 for left padding."""
        return self._mask[:, : self.size]

    def prefill(self, record_attention: bool = False) -> StepOutput:
        """Run the prompts (a fresh KV cache)."""
        L = self._L
        out = self.runtime.prefill(self._ids[:, :L], self._mask[:, :L], self._prompt_positions, record_attention)
        self.size = L
        return out

    def decode(self, next_ids: np.ndarray, record_attention: bool = False) -> StepOutput:
        """Feed one id per row (B,) at the next position of each row."""
        if self.size == 0:
            raise GenerationError("decode before prefill; call prefill() first")
        S = self.size
        if S == self._ids.shape[1]:
            self._grow()
        self._ids[:, S] = next_ids
        self._mask[:, S] = 1
        out = self.runtime.decode(self._ids[:, S : S + 1], self._mask[:, : S + 1], self._next_pos, record_attention)
        self.size = S + 1
        self._next_pos = self._next_pos + 1  # a new array: the runtime may still hold the last one
        return out

    def _grow(self) -> None:
        extra = np.zeros_like(self._ids)
        self._ids = np.concatenate([self._ids, extra], axis=1)
        self._mask = np.concatenate([self._mask, extra], axis=1)
