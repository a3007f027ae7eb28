"""What a generation hands back: text, ids, why it stopped, timings, and (when recorded) attention."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gptdeploy.sampling import SamplingParams

FINISH_REASONS = ("eos", "stop_token", "stop_string", "length")


@dataclass(frozen=True)
class Timings:
    tokens: int  # tokens generated for this row
    time_to_first_token_s: float  # from queueing the request (the engine's submit) to its first token
    decode_tokens_per_s: float  # this row's tokens after the first / the time until it finished
    total_s: float  # from queueing to this request's last token

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    text: str  # generated text only; cut before a stop string; EOS / stop ids not rendered
    token_ids: list[int]  # generated ids, the one that ended generation (EOS, stop id) included
    prompt_token_ids: list[int]
    finish_reason: str  # one of FINISH_REASONS
    timings: Timings
    sampling: SamplingParams  # as used: a seed drawn for an unseeded sampled call is filled in
    # With record_attention: per layer (1, nh, S, S) float32 over `attention_token_ids`, rows are
    # queries, zero above the diagonal; padding stripped. The last generated token was never fed
    # to the model, so S = len(prompt_token_ids) + len(token_ids) - 1.
    attention: list[np.ndarray] | None = None

    @property
    def attention_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.token_ids[:-1]


def timings(n: int, t0: float, t_first: float, t_done: float, t_end: float) -> Timings:
    """One row's figures: `n` tokens, started at t0, first token at t_first, finished at t_done."""
    decode_s = t_done - t_first
    return Timings(
        tokens=n,
        time_to_first_token_s=t_first - t0,
        decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        total_s=t_end - t0,
    )


def assemble_attention(steps: list[list[np.ndarray]], b: int, pad: int, n_prompt: int, n_gen: int) -> list[np.ndarray]:
    """Row b's attention over its own positions: the prefill block plus one row per decode step
    that fed one of its tokens (frozen steps after it finished are left out)."""
    S = n_prompt + n_gen - 1
    out = []
    for layer, prefill in enumerate(steps[0]):
        nh = prefill.shape[1]
        att = np.zeros((1, nh, S, S), dtype=np.float32)  # (1, nh, S, S)
        att[0, :, :n_prompt, :n_prompt] = np.tril(prefill[b, :, pad:, pad:])  # (nh, Lb, Lb), causal
        for k in range(1, n_gen):  # decode step k fed generated token k-1: query position Lb+k-1
            q = n_prompt + k - 1
            att[0, :, q, : q + 1] = steps[k][layer][b, :, 0, pad:]  # (nh, Lb+k)
        out.append(att)
    return out
