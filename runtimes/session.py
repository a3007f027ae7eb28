"""A runtime over a bare session that hands back every graph output: for the checks that compare
more than the next token's logits (parity, the quantized-graph agreement, held-out perplexity).

The session is anything with onnxruntime's `get_outputs()` and `run(None, feeds)`: an
`onnxruntime.InferenceSession`, or the fp16 CPU path of exporters/fp16.py. The KV cache is kept as
numpy arrays, so this is the plain, slow path; applications use the `ort` runtime.
"""

from __future__ import annotations

import numpy as np

from gptdeploy import contract as io
from gptdeploy.contract import GraphSignature
from gptdeploy.manifest import GraphEntry
from gptdeploy.runtimes.base import RuntimeBase, StepOutput


class SessionRuntime(RuntimeBase):
    name = "session"

    def __init__(self, session, signature: GraphSignature, label: str = "graph"):
        super().__init__(None, GraphEntry(label, label, label, signature))
        self.session = session
        self._names = [o.name for o in session.get_outputs()]
        self._past: dict[str, np.ndarray] = {}

    def _prefill(self, input_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        sig = self.graph.signature
        shape = (input_ids.shape[0], sig.kv_heads, 0, sig.head_dim)  # (B, nkv, 0, hs)
        empty = {n: np.zeros(shape, dtype=sig.kv_dtype) for n in sig.past_names()}
        return self._run(input_ids, attention_mask, position_ids, empty, record_attention)

    def _decode(self, next_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        return self._run(next_ids, attention_mask, position_ids, self._past, record_attention)

    def _run(self, ids, mask, pos, past: dict, record_attention: bool) -> StepOutput:
        sig = self.graph.signature
        feeds = {io.INPUT_IDS: np.ascontiguousarray(ids, np.int64), io.ATTENTION_MASK: np.ascontiguousarray(mask, np.int64),
                 io.POSITION_IDS: np.ascontiguousarray(pos, np.int64), **past}
        outs = dict(zip(self._names, self.session.run(None, feeds)))
        self._past = {p: outs[q] for p, q in zip(sig.past_names(), sig.present_names())}
        attentions = [outs[n] for n in sig.attention_names()] if record_attention else None
        return StepOutput(outs[io.LOGITS][:, -1, :], attentions, outs)  # logits (B, V)

    def _take_cache(self) -> list[np.ndarray]:
        return [self._past[n].copy() for n in self.graph.signature.past_names()]

    def _put_cache(self, arrays: list[np.ndarray]) -> None:
        self._past = dict(zip(self.graph.signature.past_names(), arrays))

    def _drop_cache(self) -> None:
        self._past = {}

    def _release(self) -> None:
        self.session = None
