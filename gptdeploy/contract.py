"""The graph IO contract, defined once: names, dtypes and axes of every graph input and output.

The exporter, parity checks, TensorRT profiles, runtimes and manifest all read this module;
no other module spells a tensor name. Names follow the Hugging Face ONNX ecosystem
(Optimum's `past_key_values.{i}.key` / `present.{i}.key`) so other tools can load our graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

# Symbolic axis names, as they appear in the ONNX graph.
BATCH = "batch_size"
SEQ = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"  # past + seq


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


def attention(i: int) -> str:
    return f"attentions.{i}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    axes: tuple[str | int, ...]  # symbolic names above, or fixed sizes


@dataclass(frozen=True)
class GraphSignature:
    """Everything a consumer needs to feed and read one exported graph."""

    n_layer: int
    n_head: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: str = "float32"
    attentions: bool = True  # audit graphs return per-layer attention probabilities
    last_logits_only: bool = False  # logits for the last position only: [batch, 1, vocab]

    @classmethod
    def for_config(
        cls, config, *, kv_dtype: str = "float32", attentions: bool = True, last_logits_only: bool = False
    ) -> GraphSignature:
        """The signature of a graph exported from a model with `config` (a GPTConfig)."""
        return cls(
            n_layer=config.n_layer,
            n_head=config.n_head,
            kv_heads=config.kv_heads,
            head_dim=config.head_dim,
            vocab_size=config.vocab_size,
            kv_dtype=kv_dtype,
            attentions=attentions,
            last_logits_only=last_logits_only,
        )

    def past_names(self) -> list[str]:
        return [n for i in range(self.n_layer) for n in (past_key(i), past_value(i))]

    def present_names(self) -> list[str]:
        return [n for i in range(self.n_layer) for n in (present_key(i), present_value(i))]

    def attention_names(self) -> list[str]:
        return [attention(i) for i in range(self.n_layer)] if self.attentions else []

    def inputs(self) -> list[TensorSpec]:
        kv = (BATCH, self.kv_heads, PAST, self.head_dim)
        return [
            TensorSpec(INPUT_IDS, "int64", (BATCH, SEQ)),
            TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL)),
            TensorSpec(POSITION_IDS, "int64", (BATCH, SEQ)),
            *(TensorSpec(n, self.kv_dtype, kv) for n in self.past_names()),
        ]

    def outputs(self) -> list[TensorSpec]:
        kv = (BATCH, self.kv_heads, TOTAL, self.head_dim)
        logits_seq: str | int = 1 if self.last_logits_only else SEQ
        return [
            TensorSpec(LOGITS, "float32", (BATCH, logits_seq, self.vocab_size)),
            *(TensorSpec(n, self.kv_dtype, kv) for n in self.present_names()),
            *(TensorSpec(n, "float32", (BATCH, self.n_head, SEQ, TOTAL)) for n in self.attention_names()),
        ]

    def to_dict(self) -> dict:
        return {
            "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.axes)} for s in self.inputs()],
            "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.axes)} for s in self.outputs()],
        }
