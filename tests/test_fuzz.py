"""Property-based fuzzing of what a bundle's reader parses: the manifest (JSON-level and byte-level
mutations), the tokenizer file (byte-level) and the graph's protobuf (the external-data walker).
Loading either succeeds or raises GptDeployError, never anything else, and never hangs.

Audit logs are fuzzed the same way in tests/test_audit.py::test_mutated_logs_give_a_report_or_an_audit_error.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptdeploy.bundle import Bundle
from gptdeploy.errors import GptDeployError
from gptdeploy.graph_refs import GraphParseError, external_data_refs_bytes
from gptdeploy.hashing import sha256_file
from gptdeploy.manifest import MANIFEST
from gptdeploy.tokenizer import Tokenizer
from tests.runtime_bundles import made

EXAMPLE_TIMEOUT_S = 5  # per example; a load of this bundle takes ~10 ms (measured)
FUZZ = settings(
    max_examples=250, deadline=2000, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail an example that hangs (hypothesis' deadline only reports slowness after the fact)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise TimeoutError(f"an example took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load_all(root) -> None:
    """What a runtime does before it opens a graph: the bundle, then its tokenizer."""
    with time_limit(EXAMPLE_TIMEOUT_S):
        try:
            bundle = Bundle.load(root)
            tok = Tokenizer.from_bundle(bundle)
            tok.decode(tok.encode("Hello, 你好"))
        except GptDeployError:
            pass


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    """A bundle whose graph and tokenizer are hard links to a real one: examples rewrite only
    the files they mutate (hard links, unlike symlinks, stay inside the bundle)."""
    src = made("small").bundle
    root = tmp_path_factory.mktemp("fuzz") / "bundle"
    root.mkdir()
    for name in os.listdir(src):
        os.link(src / name, root / name)
    return root, json.loads((src / MANIFEST).read_text()), (src / "tokenizer.json").read_bytes()


def _write(path, data: bytes) -> None:
    path.unlink(missing_ok=True)  # never write through a hard link into the shared bundle
    path.write_bytes(data)


# ---------------------------------------------------------------------------- manifest, JSON

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([10**400, -1, 0, 2**63]) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["../x", "/etc/passwd", "model.onnx", "\ud800", "fp32", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def manifest_mutation(draw, base: dict):
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        node = data
        # walk down a random path of dicts and lists
        for _depth in range(draw(st.integers(0, 3))):
            children = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
            if not children:
                break
            key = draw(st.sampled_from(children))
            if not isinstance(node[key], (dict, list)):
                break
            node = node[key]
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            action = draw(st.sampled_from(["delete", "replace", "add"]))
            if action == "delete":
                del node[key]
            elif action == "replace":
                node[key] = draw(JUNK)
            else:
                node[draw(st.text(max_size=8))] = draw(JUNK)
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(JUNK)
    return data


def test_mutated_manifests_load_or_raise_gptdeploy_error(fuzz_dir):
    root, base, _ = fuzz_dir
    runs = []

    @FUZZ
    @given(manifest_mutation(base))
    def check(data):
        runs.append(1)
        text = json.dumps(data, ensure_ascii=False, allow_nan=True)
        _write(root / MANIFEST, text.encode("utf-8", "surrogatepass"))
        load_all(root)

    check()
    assert len(runs) >= 100


@FUZZ
@given(st.data())
def test_byte_mutated_manifests_load_or_raise_gptdeploy_error(fuzz_dir, data):
    root, base, _ = fuzz_dir
    raw = bytearray(json.dumps(base, indent=2).encode())
    _write(root / MANIFEST, bytes(_mutate_bytes(data, raw)))
    load_all(root)


# ------------------------------------------------------------------------- tokenizer, bytes


def _mutate_bytes(data, raw: bytearray) -> bytearray:
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[i] ^= data.draw(st.integers(1, 255))
        elif kind == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del raw[i : i + data.draw(st.integers(1, 64))]
        elif kind == "truncate":
            del raw[i:]
        else:  # copy one stretch over another: keeps the JSON plausible more often than random bytes
            j = data.draw(st.integers(0, max(0, len(raw) - 1)))
            n = data.draw(st.integers(1, 200))
            raw[i : i + n] = raw[j : j + n]
    return raw


@FUZZ
@given(st.data())
def test_byte_mutated_tokenizers_load_or_raise_gptdeploy_error(fuzz_dir, data):
    root, base, tok = fuzz_dir
    _write(root / "tokenizer.json", bytes(_mutate_bytes(data, bytearray(tok))))
    manifest = copy.deepcopy(base)
    manifest["files"]["tokenizer.json"] = sha256_file(root / "tokenizer.json")  # reach the parser
    _write(root / MANIFEST, json.dumps(manifest).encode())
    load_all(root)


# ----------------------------------------------------------------------------- graph, bytes


@FUZZ
@given(st.data())
def test_byte_mutated_graphs_give_refs_or_a_parse_error(data):
    raw = (made("small").bundle / "model.onnx").read_bytes()
    mutated = bytes(_mutate_bytes(data, bytearray(raw)))
    with time_limit(EXAMPLE_TIMEOUT_S):
        try:
            refs = external_data_refs_bytes(mutated)
        except GraphParseError:
            return
    assert all(isinstance(r.location, str) for r in refs)
