"""The evidence a graph carries into its manifest: what every check report offers its readers.

Two kinds of report implement it: parity.ParityReport (a graph against the source framework,
tensor by tensor) and exporters.agreement.AgreementReport (a quantized graph against the fp32
graph, by perplexity and decision margins). The CLI, the manifest and `verify` read only this.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Evidence(Protocol):
    reference: str  # what the graph was compared with
    precision: str
    greedy_steps: int
    graph_tokens: list[list[int]]  # the graph's greedy tokens per prompt
    reference_tokens: list[list[int]]

    @property
    def passed(self) -> bool: ...

    @property
    def greedy_ok(self) -> bool: ...

    @property
    def greedy_agree(self) -> int:
        """Leading greedy steps on which every prompt agrees."""
        ...

    def worst(self, prefix: str) -> float:
        """The largest measured value among checks whose name starts with `prefix`."""
        ...

    def summary(self) -> dict[str, dict]:
        """Per check kind: {"max_abs_diff": value, "tolerance": bound} (the tightest one)."""
        ...

    def describe(self) -> str:
        """One line for a person: what was compared and how close it came."""
        ...

    def describe_failures(self) -> str: ...

    def to_dict(self) -> dict: ...
