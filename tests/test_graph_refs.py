"""External data that leaves the bundle, and pickles inside it, are refused by Bundle.load,
before onnxruntime opens anything. The protobuf walker agrees with onnx's own reader."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors, set_external_data, uses_external_data

from gptdeploy.bundle import Bundle
from gptdeploy.errors import BundleError
from gptdeploy.graph_refs import GraphParseError, external_data_refs, external_data_refs_bytes
from gptdeploy.hashing import sha256_file
from gptdeploy.manifest import MANIFEST
from tests.runtime_bundles import copy_bundle, made

W = np.arange(6, dtype=np.float32).reshape(2, 3)


def _external(name: str, array: np.ndarray, location: str) -> TensorProto:
    t = numpy_helper.from_array(array, name)
    set_external_data(t, location=location, offset=0, length=array.nbytes)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    return t


def _add_model(location: str) -> onnx.ModelProto:
    """y = x + W, W stored in `location`."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [_external("W", W, location)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _nested_model() -> onnx.ModelProto:
    """External tensors in an If branch's Constant, a sparse initializer and training_info."""
    const = helper.make_node("Constant", [], ["c"], value=_external("deep", W, "deep.bin"))
    branch = helper.make_graph([const], "then", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])])
    cond = helper.make_node("If", ["b"], ["y"], then_branch=branch, else_branch=branch)
    sparse = helper.make_sparse_tensor(
        _external("sp_values", np.ones(2, np.float32), "sparse.bin"),
        numpy_helper.from_array(np.array([0, 4], np.int64), "sp_idx"), [2, 3])
    graph = helper.make_graph(
        [cond], "g", [helper.make_tensor_value_info("b", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [_external("W", W, "w.bin")], sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.training_info.add().initialization.CopyFrom(
        helper.make_graph([], "init", [], [], [_external("train", W, "train.bin")]))
    return model


def _bundle(tmp_path, location: str, *, list_location: str | None = "w.bin"):
    """A bundle whose model.onnx reads W from `location`; the manifest lists `list_location`."""
    root = copy_bundle(made("small").bundle, tmp_path / "bundle")
    (root / "w.bin").write_bytes(W.tobytes())
    onnx.save_model(_add_model(location), str(root / "model.onnx"))
    data = json.loads((root / MANIFEST).read_text())
    data["files"]["model.onnx"] = sha256_file(root / "model.onnx")
    if list_location:
        data["files"][list_location] = sha256_file(root / list_location)
    (root / MANIFEST).write_text(json.dumps(data))
    return root


def _no_ort(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("onnxruntime opened the graph")

    monkeypatch.setattr(ort, "InferenceSession", refuse)


def test_a_legit_external_data_bundle_loads_and_the_walker_reads_what_onnxruntime_reads(tmp_path):
    root = _bundle(tmp_path, "w.bin")
    bundle = Bundle.load(root)
    assert [(r.tensor, r.location) for r in external_data_refs(bundle.file("model.onnx"))] == [("W", "w.bin")]
    sess = ort.InferenceSession(str(root / "model.onnx"))
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], x + W)


@pytest.mark.parametrize("location, fragment", [
    ("../outside.bin", "leaves the bundle directory"),
    ("sub/../../outside.bin", "leaves the bundle directory"),
    ("/etc/passwd", "absolute"),
    ("link.bin", "resolves outside the bundle"),
    ("unlisted.bin", "does not list"),
])
def test_external_data_outside_the_bundle_is_refused_before_onnxruntime_opens_it(
    tmp_path, monkeypatch, location, fragment
):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(W.tobytes())
    root = _bundle(tmp_path, location, list_location=None)
    if location == "link.bin":
        os.symlink(outside, root / "link.bin")
    if location == "unlisted.bin":
        (root / "unlisted.bin").write_bytes(W.tobytes())
    _no_ort(monkeypatch)
    from gptdeploy.generate import Generator

    for load in (Bundle.load, lambda p: Bundle.load(p, verify_hashes=False), Generator.load):
        with pytest.raises(BundleError) as err:
            load(root)
        msg = str(err.value)
        assert repr(location) in msg and "tensor 'W'" in msg and fragment in msg, msg


def test_a_listed_symlink_escaping_the_bundle_is_refused(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(W.tobytes())
    root = _bundle(tmp_path, "w.bin")
    (root / "w.bin").unlink()
    os.symlink(outside, root / "w.bin")
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        Bundle.load(root)


def test_nested_subgraphs_sparse_and_training_tensors_are_found_like_onnx_finds_them(tmp_path):
    model = _nested_model()
    want = sorted((t.name, next(e.value for e in t.external_data if e.key == "location"))
                  for t in _get_all_tensors(model) if uses_external_data(t))
    got = sorted((r.tensor, r.location) for r in external_data_refs_bytes(model.SerializeToString()))
    # onnx's helper skips sparse and training tensors; the walker must find them too.
    assert set(want) <= set(got)
    assert got == sorted([("W", "w.bin"), ("deep", "deep.bin"), ("deep", "deep.bin"),
                          ("sp_values", "sparse.bin"), ("train", "train.bin")])


def test_exported_graphs_agree_with_onnx(tmp_path):
    from gptdeploy.exporters.graph_files import save_graph

    plain = made("small").bundle / "model.onnx"
    assert external_data_refs(plain) == []
    proto = onnx.load(str(plain))
    data_file = save_graph(proto, tmp_path / "model.onnx", external_data=True)
    refs = external_data_refs(tmp_path / "model.onnx")
    reloaded = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert [(r.tensor, r.location) for r in refs] == [
        (t.name, data_file) for t in _get_all_tensors(reloaded) if uses_external_data(t)]
    assert 8 < len(refs) < len(proto.graph.initializer)  # small tensors stay inline: a mixed graph


@pytest.mark.parametrize("damage", ["truncate", "bad wire type", "runaway varint"])
def test_bytes_that_are_not_protobuf_raise_graph_parse_error(damage):
    data = _add_model("w.bin").SerializeToString()
    bad = {"truncate": data[: len(data) // 2], "bad wire type": data + b"\x0f",
           "runaway varint": data + b"\x08" + b"\xff" * 12}[damage]
    with pytest.raises(GraphParseError):
        external_data_refs_bytes(bad)


def test_an_empty_graph_file_has_no_refs(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    assert external_data_refs(tmp_path / "m.onnx") == []


# ------------------------------------------------------------------------- no pickle inside

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("name, content, fragment", [
    ("meta.pkl", pickle.dumps({"stoi": {}}), "named like a pickle"),
    ("extra.json", pickle.dumps(_Evil(), protocol=4), "a pickle (protocol 4)"),
    ("weights.bin", b"PK\x03\x04" + b"\x00" * 26 + b"archive/data.pkl" + b"\x00" * 64, "torch.save archive"),
])
def test_a_pickle_listed_in_the_bundle_is_refused(tmp_path, name, content, fragment):
    root = copy_bundle(made("small").bundle, tmp_path / "bundle")
    (root / name).write_bytes(content)
    data = json.loads((root / MANIFEST).read_text())
    data["files"][name] = sha256_file(root / name)
    (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="holds no pickles") as err:
        Bundle.load(root)
    assert repr(name) in str(err.value) and fragment in str(err.value)
