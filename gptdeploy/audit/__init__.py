"""The audit: what a deployed model was asked, what it answered, and what it attended to.

    labels.py  readable per-token labels (a character split over tokens is shown as one)
    record.py  AuditRecord: attention per layer and head, packed; building and reading records
    log.py     the log format: framed, hash-chained records (docs/audit-format.md)
    append.py  appending under a file lock, crash-safe
    verify.py  checking the chain: altered, inserted, removed or reordered records
    views.py   head matrices, rollout, top sources, PNG heatmaps, bertviz-style export
    report.py  the self-contained HTML report (page.py holds its template)

numpy only, like the rest of the run path.
"""

from gptdeploy.audit.labels import Tokens, token_labels
from gptdeploy.audit.record import (
    AuditOptions,
    AuditRecord,
    append_generation,
    append_records,
    build_record,
    pack_tril,
    read_records,
    unpack_tril,
)

__all__ = [
    "AuditOptions",
    "AuditRecord",
    "Tokens",
    "append_generation",
    "append_records",
    "build_record",
    "pack_tril",
    "read_records",
    "token_labels",
    "unpack_tril",
]
