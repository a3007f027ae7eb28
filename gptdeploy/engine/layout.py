"""The batch's KV layout: every row's positions right-aligned in the cache's P columns, with left
padding (mask 0) before them. numpy only.

    row 0   . . K K K K K      mask 0 0 1 1 1 1 1   position of the next token: 5
    row 1   K K K K K K K           1 1 1 1 1 1 1                               7
    row 2   . . . . K K K           0 0 0 0 1 1 1                               3

A decode step appends one column for every row, so the layout holds between events; when jobs
join or leave, `gather` builds the new cache from the rows that stay and the joiners' own
prefill, with P = the longest row: columns masked in every row are dropped there.
Shapes: B batch, nkv KV heads, P cache positions, hs head size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def step_inputs(lengths: np.ndarray, P: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask (B, P+1) and position ids (B, 1) for a decode step: each row's `lengths` positions are
    the last ones of the P columns, and the new token goes at position `lengths` (counted from 0)."""
    cols = np.arange(P + 1)  # (P+1,)
    mask = (cols[None, :] >= (P - lengths)[:, None]).astype(np.int64)  # (B, P+1)
    return mask, lengths[:, None].astype(np.int64)  # (B, 1)


def gather(
    sources: Sequence[Sequence[np.ndarray]], picks: Sequence[tuple[int, int, int]]
) -> list[np.ndarray]:
    """New cache arrays, one per past name: row r is row `picks[r][1]` of `sources[picks[r][0]]`
    (each source a list of (B_s, nkv, P_s, hs) arrays), its last `picks[r][2]` positions
    right-aligned in P = max of those; the columns left of them are zeros (masked, never read)."""
    P = max(n for _, _, n in picks)
    out = []
    for k, first in enumerate(sources[picks[0][0]]):
        _, nkv, _, hs = first.shape
        merged = np.zeros((len(picks), nkv, P, hs), dtype=first.dtype)  # (B, nkv, P, hs)
        for r, (s, row, n) in enumerate(picks):
            src = sources[s][k]  # (B_s, nkv, P_s, hs)
            merged[r, :, P - n :] = src[row, :, src.shape[2] - n :]
        out.append(merged)
    return out
