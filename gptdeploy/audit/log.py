"""The audit log file: append-only frames, hash-chained. The format is docs/audit-format.md.

    frame  := header payload "\\n"
    header := '{"sha256":"' HEX64 '",' REST "\\n"   one line of canonical JSON (sorted keys, no spaces)
    sha256  = SHA-256("{" + REST)                   the header as written, without its own hash
    payload := header["payload"]["bytes"] bytes of npz (the attention tensors)

The header names the previous record's sha256 (`prev`, 64 zeros for the first), its own
position (`index`) and the payload's SHA-256, so one hash commits to the whole frame and to
everything before it. Appending is audit_append.py; a crash there leaves a torn final frame,
which `scan` reports as such.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy.errors import AuditError
from gptdeploy.hashing import sha256_range

FORMAT = "gptdeploy-audit"
VERSION = 1
GENESIS = "0" * 64  # `prev` of the first record
PREFIX = b'{"sha256":"'
_REST = len(PREFIX) + 64 + 2  # header bytes before REST: prefix, 64 hex digits, '",'
MARK = b"\n" + PREFIX  # where a frame can start, for resynchronising after a damaged one
MAX_HEADER = 64 << 20  # a header line longer than this is not ours (a 2k-token record is ~100 kB)
CHUNK = 1 << 20
_FORMAT_KEY = b'"format":"' + FORMAT.encode() + b'"'
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Frame:
    """One frame as found on disk; `problem` says what is wrong with it, if anything."""

    position: int  # ordinal in the file, counting damaged frames
    offset: int  # byte offset of the header line
    end: int  # byte offset after the frame
    header: dict | None = None  # parsed JSON; None when it is not readable
    stored_sha: str | None = None  # the hash the header claims
    header_ok: bool = False  # the header bytes match their hash
    payload_offset: int = 0
    payload_size: int = 0
    payload_ok: bool | None = None  # None: not hashed (append scans) or not reachable
    problem: str | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None and self.header_ok and self.payload_ok is not False

    @property
    def index(self) -> int | None:
        return self.header.get("index") if self.header else None

    @property
    def prev(self) -> str | None:
        return self.header.get("prev") if self.header else None


@dataclass
class Scan:
    path: Path
    size: int
    frames: list[Frame] = field(default_factory=list)
    torn: tuple[int, str] | None = None  # (offset, what is missing) of an incomplete last frame
    junk: list[tuple[int, int]] = field(default_factory=list)  # byte ranges that are no frame at all

    @property
    def good_end(self) -> int:
        """Where the next frame goes: after the last complete frame (before a torn tail)."""
        return self.torn[0] if self.torn else self.size


def encode_header(body: dict) -> tuple[bytes, str]:
    """The header line for `body` (which must not hold "sha256") and its hash."""
    rest = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    raw = rest.encode("utf-8")  # (len,) canonical body, '{' ... '}'
    digest = hashlib.sha256(raw).hexdigest()
    return PREFIX + digest.encode("ascii") + b'",' + raw[1:] + b"\n", digest


def _parse_header(line: bytes) -> tuple[dict | None, str | None, bool, str | None]:
    """(header, stored hash, hash ok, problem) for a header line without its newline."""
    if not line.startswith(PREFIX) or line[_REST - 2 : _REST] != b'",' or len(line) < _REST + 1:
        return None, None, False, "header line is not a gptdeploy audit header"
    stored = line[len(PREFIX) : _REST - 2].decode("ascii", "replace")
    ok = hashlib.sha256(b"{" + line[_REST:]).hexdigest() == stored
    try:
        header = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return None, stored, False, f"header is not valid JSON ({str(exc)[:60]})"
    if not isinstance(header, dict) or header.get("sha256") != stored:
        return None, stored, False, "header is not a JSON object with one sha256"
    return header, stored, ok, None


def _field_problem(h: dict) -> str | None:
    p = h.get("payload")
    if h.get("format") != FORMAT:
        return f"header format is {h.get('format')!r}, not {FORMAT!r}"
    if not _nat(h.get("version")) or not _nat(h.get("index")):
        return "header version / index are not non-negative integers"
    if not isinstance(h.get("prev"), str) or not _HEX64.fullmatch(h["prev"]):
        return "header prev is not a SHA-256"
    if not isinstance(p, dict) or not _nat(p.get("bytes")) or not _HEX64.fullmatch(str(p.get("sha256"))):
        return "header payload entry is malformed"
    return None


def _nat(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _starts_frame(b: bytes) -> bool:
    """b is the start of a frame, or the start of one cut short by the end of the file."""
    return b.startswith(PREFIX) or (len(b) < len(PREFIX) and PREFIX.startswith(b))


def scan(path: str | os.PathLike, hash_payloads: bool = True) -> Scan:
    """Read every frame's header (and, with hash_payloads, check its payload). Never raises for
    damage, which it reports; raises AuditError for unreadable files and newer versions."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return scan_file(f, path, os.fstat(f.fileno()).st_size, hash_payloads)
    except IsADirectoryError:
        raise AuditError(f"{path} is a directory, not an audit log") from None
    except FileNotFoundError:
        raise AuditError(f"audit log {path} does not exist") from None
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror or exc}") from None


def scan_file(f, path: Path, size: int, hash_payloads: bool, start: int = 0) -> Scan:
    out = Scan(path, size)
    pos = start
    while pos < size:
        f.seek(pos)
        line = f.readline(MAX_HEADER + 1)
        if not line.endswith(b"\n"):
            if pos + len(line) >= size and _starts_frame(line):
                out.torn = (pos, "its header line is incomplete")
            else:
                _damaged(out, f, pos, size, "header line has no end", line)
            return out
        header, stored, ok, problem = _parse_header(line[:-1])
        version = header.get("version") if header else None
        if ok and header.get("format") == FORMAT and _nat(version) and version > VERSION:
            raise AuditError(
                f"{path}: record {len(out.frames)} uses audit format version {version}; "
                f"this gptdeploy reads version {VERSION}. Upgrade gptdeploy to read it."
            )
        problem = problem or _field_problem(header)
        if problem:
            pos = _damaged(out, f, pos, size, problem, line)
            continue
        n = header["payload"]["bytes"]
        start, end = pos + len(line), pos + len(line) + n + 1
        if end > size and ok:
            out.torn = (pos, f"its payload is incomplete ({size - start} of {n + 1} bytes)")
            return out
        f.seek(start + n)
        newline, after = f.read(1), f.read(len(PREFIX))
        if ok and end <= size and newline != b"\n" and (end == size or _starts_frame(after)):
            # a hashed header's size holds and the next frame starts right after: one byte changed
            out.frames.append(Frame(len(out.frames), pos, end, header, stored, ok, start, n,
                                    problem="the byte after its payload is not a newline"))
            pos = end
            continue
        if end > size or newline != b"\n" or not (ok or end == size or _starts_frame(after)):
            why = "bytes inserted or removed inside it" if ok else "its header was altered"
            pos = _damaged(out, f, pos, size, f"frame does not end where its header says ({why})", line)
            continue
        frame = Frame(len(out.frames), pos, end, header, stored, ok, start, n)
        if hash_payloads:
            frame.payload_ok = sha256_range(f, start, n) == header["payload"]["sha256"]
        out.frames.append(frame)
        pos = end
    return out


def _damaged(out: Scan, f, pos: int, size: int, problem: str, line: bytes) -> int:
    """Record a damaged frame (or junk) from pos to the next frame start; return that start."""
    nxt = _find_mark(f, pos, size)
    end = size if nxt is None else nxt
    if _starts_frame(line[: len(PREFIX)]) or _FORMAT_KEY in line:  # a frame, damaged (even its prefix)
        stored = line[len(PREFIX) : _REST - 2].decode("ascii", "replace") if len(line) >= _REST else None
        out.frames.append(Frame(len(out.frames), pos, end, None, stored, False, problem=problem))
    else:
        out.junk.append((pos, end))
    return end


def _find_mark(f, start: int, size: int) -> int | None:
    """Offset of the next frame start after `start` (just past a b"\\n" + PREFIX), or None."""
    pos = start
    while pos < size:
        f.seek(pos)
        chunk = f.read(CHUNK + len(MARK))
        i = chunk.find(MARK)
        if i >= 0:
            return pos + i + 1
        pos += CHUNK
    return None


def read_payload(path: Path, frame: Frame) -> bytes:
    """The payload bytes of an intact frame, checked against the header's hash again."""
    with open(path, "rb") as f:
        f.seek(frame.payload_offset)
        data = f.read(frame.payload_size)
    if hashlib.sha256(data).hexdigest() != frame.header["payload"]["sha256"]:
        raise AuditError(f"{path}: record {frame.position} changed while it was being read")
    return data
