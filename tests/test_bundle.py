"""The bundle contract: manifest validation, integrity, confinement. Torch-free on purpose."""

from __future__ import annotations

import json
import os

import pytest

from gptdeploy.bundle import Bundle, confined, write_manifest
from gptdeploy.config import GPTConfig
from gptdeploy.contract import GraphSignature
from gptdeploy.errors import BundleError
from gptdeploy.hashing import sha256_file
from gptdeploy.manifest import MANIFEST, SCHEMA, GraphEntry, Manifest, TokenizerEntry


def _make(tmp_path, **manifest_overrides):
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "model.onnx").write_bytes(b"graph bytes")
    (root / "tokenizer.json").write_text("{}")
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=50, block_size=16)
    sig = GraphSignature(2, 2, 2, 4, 50)
    m = Manifest(
        config=cfg,
        graphs={"fp32": GraphEntry("fp32", "model.onnx", "fp32", sig)},
        tokenizer=TokenizerEntry("tokenizer.json", 40, eos_token_id=3),
        files={f: sha256_file(root / f) for f in ("model.onnx", "tokenizer.json")},
    )
    write_manifest(root, m)
    if manifest_overrides:
        data = json.loads((root / MANIFEST).read_text())
        for dotted, value in manifest_overrides.items():
            *parents, leaf = dotted.split(".")
            node = data
            for p in parents:
                node = node[p]
            if value is _DELETE:
                del node[leaf]
            else:
                node[leaf] = value
        (root / MANIFEST).write_text(json.dumps(data))
    return root


_DELETE = object()


def test_round_trip(tmp_path):
    b = Bundle.load(_make(tmp_path))
    assert b.config.n_layer == 2 and b.manifest.max_context == 16
    assert b.graph().signature.past_names()[0] == "past_key_values.0.key"
    assert b.manifest.tokenizer.eos_token_id == 3
    assert len(b.manifest_sha256) == 64


def test_altered_file_is_named(tmp_path):
    root = _make(tmp_path)
    (root / "model.onnx").write_bytes(b"graph bytez")
    with pytest.raises(BundleError, match="model.onnx does not match its SHA-256"):
        Bundle.load(root)
    Bundle.load(root, verify_hashes=False)  # skipping hashes is possible, and logged


def test_missing_file_is_named(tmp_path):
    root = _make(tmp_path)
    (root / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        Bundle.load(root)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"schema": SCHEMA + 1}, "schema 2; this gptdeploy reads schema 1. Upgrade"),
        ({"schema": "1"}, "schema must be an integer"),
        ({"format": "other"}, "not a gptdeploy bundle manifest"),
        ({"model.n_head": 3}, "not divisible"),
        ({"model.n_layer": -1}, "n_layer must be a positive integer"),
        ({"model.flavour": "x"}, "unknown model config fields: flavour"),
        ({"graphs": {}}, "lists no graphs"),
        ({"graphs.fp32.kv_dtype": _DELETE}, "graph 'fp32' is malformed"),
        ({"tokenizer": _DELETE}, "missing field 'tokenizer'"),
        ({"tokenizer.vocab_size": 51}, "tokenizer has 51 tokens but the model only 50"),
        ({"tokenizer.eos_token_id": "3"}, "eos_token_id must be a non-negative integer"),
        ({"files": ["model.onnx"]}, "'files' must map"),
        ({"files.model.onnx": _DELETE}, "does not list a SHA-256 for model.onnx"),
        ({"files.../evil": "0" * 64}, "leaves the bundle directory"),
        ({"files./etc/passwd": "0" * 64}, "absolute path"),
        ({"graphs.fp32.file": "../model.onnx"}, "leaves the bundle directory|does not list"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, override, message):
    # keys containing dots other than as separators are set directly on the files map
    flat = {}
    for k, v in override.items():
        if k.startswith("files.") and k != "files":
            flat.setdefault("__files__", {})[k[len("files."):]] = v
        else:
            flat[k] = v
    root = _make(tmp_path, **{k: v for k, v in flat.items() if k != "__files__"})
    if "__files__" in flat:
        data = json.loads((root / MANIFEST).read_text())
        for name, v in flat["__files__"].items():
            if v is _DELETE:
                del data["files"][name]
            else:
                data["files"][name] = v
        (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        Bundle.load(root)


def test_manifest_not_json(tmp_path):
    root = _make(tmp_path)
    (root / MANIFEST).write_bytes(b"\xff\xfe not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(root)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.load(tmp_path / "nope")
    with pytest.raises(BundleError, match="gptdeploy.json is missing"):
        Bundle.load(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        Bundle.load(tmp_path / "f")


def test_symlink_escaping_the_bundle_is_refused(tmp_path):
    root = _make(tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, root / "link.txt")
    with pytest.raises(BundleError, match="outside the bundle"):
        confined(root, "link.txt")
    (root / "sub").mkdir()
    os.symlink(root / "tokenizer.json", root / "sub" / "inside.json")
    assert confined(root, "sub/inside.json") == (root / "tokenizer.json").resolve()
