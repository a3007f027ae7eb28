"""What every runtime is: one graph, one KV cache, prefill and decode (the registry is backends.py).

A runtime runs one graph of a loaded bundle and owns its KV cache wherever that lives best
(OrtValues, device buffers, torch tensors). The Generator above it sees only host logits of
the last position, [B, V] float32, and, when asked, the attention rows of the step.
Shapes: B batch, T new positions, P past positions, nh heads, V model vocab (graph rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from gptdeploy.bundle import Bundle
from gptdeploy.errors import BackendUnavailable, GenerationError
from gptdeploy.manifest import GraphEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    """What one prefill or decode step hands back to the host."""

    logits: np.ndarray  # (B, V) float32, last position only
    attentions: list[np.ndarray] | None = None  # per layer (B, nh, T, P+T) float32, when recorded
    outputs: dict[str, np.ndarray] | None = None  # every graph output by name (SessionRuntime, for checks)


class RuntimeBase:
    """Shared bookkeeping: cache length, shape checks that turn engine errors into clear ones,
    context management. Subclasses implement `_prefill`, `_decode`, `_drop_cache`, `_release`,
    and `_take_cache` / `_put_cache` to serve the batching engine (gptdeploy/engine)."""

    name = "base"

    def __init__(self, bundle: Bundle | None, graph: GraphEntry):  # no bundle: a graph checked at export
        self.bundle = bundle
        self.graph = graph
        # What one step may hold: positions (past + new) and batch rows. The model's context and no
        # batch bound here; a runtime with smaller limits of its own (a TensorRT engine's
        # profiles) sets its own, and the engine checks requests against them before queueing.
        self.max_context: int | None = bundle.manifest.max_context if bundle is not None else None
        self.max_batch: int | None = None
        self.past_length = 0
        self._batch = 0
        self._closed = False

    # -- the protocol ---------------------------------------------------------------------

    def prefill(self, input_ids, attention_mask, position_ids, record_attention=False) -> StepOutput:
        self._check_open(record_attention)
        B, T = input_ids.shape
        if T < 1 or attention_mask.shape != (B, T) or position_ids.shape != (B, T):
            raise GenerationError(
                f"prefill needs input_ids, attention_mask and position_ids of one shape (B, T>=1); got "
                f"{input_ids.shape}, {attention_mask.shape}, {position_ids.shape}"
            )
        self.reset()
        out = self._prefill(input_ids, attention_mask, position_ids, record_attention)
        self._batch, self.past_length = B, T
        return out

    def decode(self, next_ids, attention_mask, position_ids, record_attention=False) -> StepOutput:
        self._check_open(record_attention)
        if self.past_length == 0:
            raise GenerationError("decode called before prefill (or after reset); run prefill first")
        B, P = self._batch, self.past_length
        if next_ids.shape != (B, 1) or position_ids.shape != (B, 1) or attention_mask.shape != (B, P + 1):
            raise GenerationError(
                f"decode expects next_ids and position_ids ({B}, 1) and attention_mask ({B}, {P + 1}); got "
                f"{next_ids.shape}, {position_ids.shape}, {attention_mask.shape}"
            )
        out = self._decode(next_ids, attention_mask, position_ids, record_attention)
        self.past_length = P + 1
        return out

    # -- the KV cache on the host, for the batching engine's join and leave events ------------

    @property
    def can_move_cache(self) -> bool:
        """Whether take_cache / put_cache work here; the engine batches continuously only then."""
        return type(self)._put_cache is not RuntimeBase._put_cache

    def take_cache(self) -> list[np.ndarray]:
        """A host copy of the KV cache: per past name (signature order K0, V0, K1, ...), (B, nkv, P, hs)."""
        self._check_open(False)
        if self.past_length == 0:
            raise GenerationError("there is no KV cache to take; run prefill first")
        return self._take_cache()

    def put_cache(self, arrays: list[np.ndarray]) -> None:
        """Make `arrays` (as take_cache returns them) the KV cache; the next decode continues from it."""
        self._check_open(False)
        sig = self.graph.signature
        n, shape = len(sig.past_names()), arrays[0].shape if arrays else ()
        if not (len(arrays) == n and len(shape) == 4 and shape[0] >= 1 and shape[2] >= 1
                and (shape[1], shape[3]) == (sig.kv_heads, sig.head_dim)
                and all(a.shape == shape and a.dtype == np.dtype(sig.kv_dtype) for a in arrays)):
            raise GenerationError(
                f"put_cache needs {n} {sig.kv_dtype} arrays of one shape (B, {sig.kv_heads}, P>=1, "
                f"{sig.head_dim}); got {len(arrays)}, the first {shape} {arrays[0].dtype if arrays else ''}"
            )
        self._put_cache([np.ascontiguousarray(a) for a in arrays])
        self._batch, self.past_length = shape[0], shape[2]

    def reset(self) -> None:
        self._drop_cache()
        self.past_length = 0
        self._batch = 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop_cache()
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for subclasses -------------------------------------------------------------------

    def _check_open(self, record_attention: bool) -> None:
        if self._closed:
            raise GenerationError(f"the {self.name} runtime is closed; load a new one")
        if record_attention and not self.graph.signature.attentions:
            raise GenerationError(
                f"graph {self.graph.name!r} has no attention outputs; export with attentions to record them"
            )

    def _prefill(self, input_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        raise NotImplementedError

    def _decode(self, next_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        raise NotImplementedError

    def _take_cache(self) -> list[np.ndarray]:
        raise BackendUnavailable(self._no_cache_surgery())

    def _put_cache(self, arrays: list[np.ndarray]) -> None:
        raise BackendUnavailable(self._no_cache_surgery())

    def _no_cache_surgery(self) -> str:
        return (f"the {self.name} runtime cannot move its KV cache to the host, which continuous batching "
                "needs when requests join or leave; serve with a CPU backend (--backend ort)")

    def _drop_cache(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError
