"""`audit verify`: check every frame's own hashes, then rebuild the hash chain and name what
broke it: an altered, removed, inserted or reordered record, or a truncated tail.

Positions are places in the file (0 = first frame); indices are what a record says it is
(its `index` field, hashed and chained, so equal to its position in an untouched log).
The chain is rebuilt from the links themselves, not from file order: from the genesis hash,
each step takes the frame whose `prev` is the current hash (at a fork, the one that others
link to, then the earlier one). Frames the walk never reaches were inserted; a frame whose
`prev` is nowhere in the log starts a new segment after removed or re-hashed records.
Without an external anchor a hash chain cannot show that its *last* records were removed;
pass the head hash you kept (`expect_head`) to check that too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy.audit.log import GENESIS, Frame, Scan, scan
from gptdeploy.errors import AuditError

KINDS = ("altered", "removed", "inserted", "reordered", "truncated", "unreadable")


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    position: int | None  # frame position in the file, when one frame is meant
    message: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    path: Path
    records: int  # frames found (damaged ones included)
    intact: int  # frames whose own hashes hold
    head: str | None  # sha256 of the last record of the chain: keep it elsewhere as an anchor
    findings: list[Finding] = field(default_factory=list)
    scan: Scan | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def status(self) -> str:
        """ok; truncated (an interrupted append: earlier records intact); failed (tampering or damage)."""
        if self.ok:
            return "ok"
        return "truncated" if all(f.kind == "truncated" for f in self.findings) else "failed"

    def summary(self) -> str:
        head = f"; head {self.head}" if self.head else ""
        return f"{self.path}: {self.status}: {self.records} records, {self.intact} intact{head}"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "status": self.status, "records": self.records, "intact": self.intact,
                "head": self.head, "findings": [f.to_dict() for f in self.findings]}


def verify(path: str | os.PathLike, expect_head: str | None = None) -> VerifyReport:
    """Check the log at `path`; damage is reported in the result, only unreadable input raises."""
    s = scan(path, hash_payloads=True)
    if s.size and not s.frames and not s.torn:
        raise AuditError(f"{s.path} is not a gptdeploy audit log (no record header found)")
    findings = _own_hashes(s) + _chain(s.frames)
    if s.torn:
        off, why = s.torn
        findings.append(Finding("truncated", len(s.frames), (
            f"truncated tail at byte {off}: the last record (position {len(s.frames)}) is incomplete, "
            f"{why}; an append was interrupted or the file was cut. The {len(s.frames)} records before it "
            "are not affected")))
    chained = [f for f in s.frames if f.header_ok and f.problem is None]
    head = chained[-1].stored_sha if chained else None
    if expect_head is not None:
        findings += _anchor(s.frames, expect_head.strip().lower())
    findings.sort(key=lambda f: (f.position if f.position is not None else 1 << 62))
    intact = sum(f.intact for f in s.frames)
    return VerifyReport(s.path, len(s.frames) + bool(s.torn), intact, head, findings, s)


def _own_hashes(s: Scan) -> list[Finding]:
    out = []
    for a, b in s.junk:
        out.append(Finding("unreadable", None, f"bytes {a}..{b} are not an audit record (inserted or damaged)"))
    for f in s.frames:
        where = f"record at position {f.position}" + (f" (index {f.index})" if f.index is not None else "")
        if f.problem:
            out.append(Finding("altered", f.position, f"{where} at byte {f.offset} was altered or damaged: {f.problem}"))
        elif not f.header_ok:
            out.append(Finding("altered", f.position,
                               f"{where} was altered: its header (prompt, output, metadata) does not match its SHA-256"))
        elif f.payload_ok is False:
            out.append(Finding("altered", f.position,
                               f"{where} was altered: its attention tensors do not match the SHA-256 in its header"))
    return out


def _chain(frames: list[Frame]) -> list[Finding]:
    nodes = [f for f in frames if f.header is not None]
    damaged = {f.position for f in frames if f.problem or not f.header_ok}
    by_sha: dict[str, list[int]] = {}
    succ: dict[str, list[int]] = {}
    for f in nodes:
        by_sha.setdefault(f.stored_sha, []).append(f.position)
        succ.setdefault(f.prev, []).append(f.position)
    at = {f.position: f for f in nodes}
    used: set[int] = set()

    def follow(cands: list[int]) -> list[int]:
        chain = []
        while cands := [c for c in cands if c not in used]:
            best = min(cands, key=lambda c: (not succ.get(at[c].stored_sha), c))  # linked-to first
            chain.append(best)
            used.add(best)
            cands = succ.get(at[best].stored_sha, [])
        return chain

    segments = [follow(succ.get(GENESIS, []))]
    for f in nodes:  # frames whose predecessor is not in the log start new segments
        if f.position not in used and f.prev != GENESIS and f.prev not in by_sha:
            segments.append(follow([f.position]))
    findings = []
    chained_before: dict[int, Frame] = {}
    order = sorted((seg for seg in segments if seg), key=lambda seg: seg[0])
    for seg in order:
        findings += _gap(seg[0], at, chained_before, damaged)
        findings += _order(seg, at)
        for p in seg:
            chained_before[p] = at[p]
    for f in nodes:
        if f.position not in used and f.position not in damaged:
            findings.append(_inserted(f, at, by_sha, succ, used))
    return findings


def _inserted(f: Frame, at: dict[int, Frame], by_sha: dict, succ: dict, used: set[int]) -> Finding:
    copy = [q for q in by_sha.get(f.stored_sha, []) if q != f.position]
    target = max((q for q in by_sha.get(f.prev, []) if q != f.position), default=None)
    after = "the start of the log" if f.prev == GENESIS else f"position {target}"
    sibling = min((q for q in succ.get(f.prev, []) if q in used), default=None)
    if sibling is None:
        return Finding("inserted", f.position, f"record at position {f.position} (index {f.index}) is not in the "
                                                "chain: it links to a record that is already followed by another")
    if not copy and not succ.get(f.stored_sha) and not succ.get(at[sibling].stored_sha):
        a, b = sorted((f.position, sibling))
        return Finding("inserted", f.position, (
            f"records at positions {a} and {b} both claim to follow {after}: one of them was inserted "
            "(the chain alone cannot tell which; check against the head hash you kept (--expect-head))"))
    what = f"a copy of the record at position {copy[0]}" if copy else "a record outside the chain"
    return Finding("inserted", f.position, (
        f"record at position {f.position} (index {f.index}) was inserted: {what}; it claims to follow "
        f"{after}, which is followed by position {sibling} in the chain"))


def _gap(root: int, at: dict[int, Frame], chained_before: dict[int, Frame], damaged: set[int]) -> list[Finding]:
    """Explain why the segment starting at `root` does not follow the chain before it."""
    f = at[root]
    if f.prev == GENESIS:
        return []
    before = [p for p in chained_before if p < root]
    last = chained_before[max(before)] if before else None
    if root in damaged or root - 1 in damaged:
        return []  # a damaged frame, reported already, explains the broken link
    expected = last.index + 1 if last else 0
    if f.index > expected:
        n = f.index - expected
        which = f"index {expected}" if n == 1 else f"indices {expected}..{f.index - 1}"
        return [Finding("removed", root, (
            f"{n} record{'s' if n > 1 else ''} ({which}) removed before position {root}: the record there "
            f"(index {f.index}) links to a record that is not in the log"))]
    if last is not None and f.index == expected:
        return [Finding("altered", last.position, (
            f"record at position {last.position} (index {last.index}) was replaced or altered and re-hashed: "
            f"the record after it links to a different version of it"))]
    return [Finding("removed", root, (
        f"record at position {root} (index {f.index}) links to a record that is not in the log"))]


def _order(seg: list[int], at: dict[int, Frame]) -> list[Finding]:
    """Chain order vs file order within one segment: name adjacent swaps, then any other move."""
    out, i = [], 0
    while i < len(seg) - 1:
        a, b = seg[i], seg[i + 1]
        if b < a:
            if b == a - 1 and (i == 0 or seg[i - 1] < b):
                out.append(Finding("reordered", b, (
                    f"records at positions {b} and {a} are swapped: position {b} holds index {at[b].index} "
                    f"and position {a} holds index {at[a].index}, but index {at[a].index} comes first")))
                i += 2
                continue
            out.append(Finding("reordered", b, (
                f"record at position {b} (index {at[b].index}) is out of order: it follows the record at "
                f"position {a} (index {at[a].index}) in the chain")))
        i += 1
    return out


def _anchor(frames: list[Frame], head: str) -> list[Finding]:
    known = [f for f in frames if f.stored_sha == head and f.header_ok]
    if not known:
        return [Finding("removed", None, (
            f"the expected head record {head[:16]}... is not in the log: its last records were removed "
            "or the log was replaced"))]
    return []
