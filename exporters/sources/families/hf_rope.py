"""config.json's rotary settings -> config.Rope, the way transformers reads them.

transformers 5 keeps them in `rope_parameters` ({"rope_type", "rope_theta", "factor", ...});
configs written by 4.x have `rope_scaling` ({"type" or "rope_type", "factor", ...}) and a top-level
`rope_theta`; GPT-NeoX's have `rotary_pct` and `rotary_emb_base`. As in transformers'
RotaryEmbeddingConfigMixin.convert_rope_params_to_dict: `rope_scaling` wins over
`rope_parameters`, and a theta inside them over the top-level one. Only the rope types the
canonical module computes exactly are accepted (config.ROPE_SCALINGS); the rest are refused.
"""

from __future__ import annotations

from pathlib import Path

from gptdeploy.config import ROPE_SCALINGS, Rope
from gptdeploy.errors import SourceError

DEFAULT_THETA = 10000.0  # RotaryEmbeddingConfigMixin.default_theta


def rope(hf: dict, head_dim, where: Path, *, partial: bool, pct: float, max_positions) -> Rope:
    """The Rope of a config.json. `partial`: the family honours partial_rotary_factor (GPT-NeoX,
    whose default `pct` is 0.25); elsewhere a factor other than 1 is refused."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise SourceError(
            f"{where}: rope parameters per layer type (or not an object) are not supported; "
            f"supported: one rope_parameters object with rope_type {', '.join(ROPE_SCALINGS)}"
        )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise SourceError(f"{where}: rope_type {kind!r} is not supported; supported: {', '.join(ROPE_SCALINGS)}")
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", DEFAULT_THETA)))
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", pct)))
    dim = None
    if factor != 1.0:
        if not partial:
            raise SourceError(f"{where}: partial_rotary_factor {factor!r} is not supported for this family")
        if not (isinstance(factor, (int, float)) and 0 < factor <= 1 and isinstance(head_dim, int)):
            raise SourceError(f"{where}: partial rotary factor {factor!r} must be in (0, 1]")
        dim = int(head_dim * factor)  # transformers: rotary_ndims = int(head_size * partial_rotary_factor)
    return Rope(
        theta=float(theta) if isinstance(theta, (int, float)) else theta,
        dim=dim,
        scaling=kind,
        factor=_required(params, "factor", kind, where) if kind != "default" else 1.0,
        low_freq_factor=_required(params, "low_freq_factor", kind, where) if kind == "llama3" else 1.0,
        high_freq_factor=_required(params, "high_freq_factor", kind, where) if kind == "llama3" else 4.0,
        # transformers' standardize_rope_params: llama3 falls back to max_position_embeddings
        original_max_positions=(params.get("original_max_position_embeddings") or max_positions)
        if kind == "llama3" else None,
    )


def _required(params: dict, key: str, kind: str, where: Path):
    if key not in params:
        raise SourceError(f"{where}: rope_type {kind!r} needs {key} in rope_parameters")
    value = params[key]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
