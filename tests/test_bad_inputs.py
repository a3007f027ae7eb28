"""The catalogue of bad inputs (issue 8): every case is one CLI call that must end in exit code 2,
exactly one stderr line `error: ...` naming the problem, no traceback, and nothing written.

docs/bad-inputs.md holds the same table; `python -m tests.test_bad_inputs` prints it, and
test_the_doc_table_lists_every_case keeps the two in sync.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from gptdeploy.cli import cli
from gptdeploy.hashing import sha256_file
from gptdeploy.manifest import MANIFEST

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad-inputs.md"
SAMPLES = ROOT / "samples"
SHARD_INDEX = "model.safetensors.index.json"  # sharded safetensors: {"weight_map": {tensor: shard file}}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass(frozen=True)
class Shared:
    bundle: Path  # a valid bundle (runtime_bundles "small": 128 positions); never modified
    hf: Path  # a valid HF GPT-2 source directory; never modified
    log: Path  # a valid audit log with two records; never modified
    llama: Path  # a valid HF Llama source directory with sharded weights; never modified


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # for the doc table
    fragment: str  # must appear in the one error line
    build: Callable  # (tmp_path, shared, monkeypatch) -> (args, stdin bytes or None)


def _copy(shared: Shared, tmp: Path) -> Path:
    return Path(shutil.copytree(shared.bundle, tmp / "b"))


def _edit_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    edit(data)
    (bundle / MANIFEST).write_text(json.dumps(data))


def _replace_file(bundle: Path, name: str, content: bytes) -> Path:
    """Replace a bundle file and re-record its hash, so the damage reaches the file's reader."""
    (bundle / name).write_bytes(content)
    _edit_manifest(bundle, lambda d: d["files"].__setitem__(name, sha256_file(bundle / name)))
    return bundle


def _half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _unreadable_tokenizer(tmp, s, mp):
    """chmod 000 where that blocks reads; as root (CI) it does not, so a directory takes the file's place."""
    b = _copy(s, tmp)
    if IS_ROOT:
        (b / "tokenizer.json").unlink()
        (b / "tokenizer.json").mkdir()
    else:
        (b / "tokenizer.json").chmod(0)
    return ["generate", b, "hi"], None


def _escaping_external_data(tmp, s, mp):
    import onnx

    b = _copy(s, tmp)
    (tmp / "weights.bin").write_bytes(b"\0" * 64)
    proto = onnx.load(str(b / "model.onnx"))
    t = proto.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../weights.bin")
    _replace_file(b, "model.onnx", proto.SerializeToString())
    return ["verify", b, "--integrity-only"], None


def _disk_full(tmp, s, mp):
    import onnx

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(onnx, "save_model", no_space)
    return ["export", s.hf, "-o", tmp / "out"], None


def _malicious_meta(tmp, s, mp):
    from tests.factories import make_nanogpt_ckpt

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    ckpt = make_nanogpt_ckpt(tmp / "nano")
    (ckpt.parent / "meta.pkl").write_bytes(pickle.dumps(Evil()))
    return ["export", ckpt, "-o", tmp / "out"], None


def _code_in_ckpt(tmp, s, mp):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    d = tmp / "nano"
    d.mkdir()
    torch.save({"model": Evil(), "model_args": {}}, d / "ckpt.pt")
    return ["export", d / "ckpt.pt", "-o", tmp / "out"], None


def _char_vocab_prompt(tmp, s, mp):
    """A nanoGPT character vocabulary (meta.pkl) has no unknown token: `é` cannot be encoded."""
    from tests.factories import make_nanogpt_ckpt
    from tests.runtime_bundles import write_bundle

    ckpt = make_nanogpt_ckpt(tmp / "nano", n_layer=1, n_head=2, n_embd=16, block_size=32)
    return ["generate", write_bundle(ckpt, tmp / "b"), "héllo"], None


def _torch_on_int8(tmp, s, mp):
    """An int8 graph holds no float Linear weights for the torch runtime to rebuild the model from."""
    from gptdeploy.exporters.export import export_bundle
    from tests.factories import make_nanogpt_ckpt

    ckpt = make_nanogpt_ckpt(tmp / "nano", n_layer=1, n_head=2, n_embd=16, block_size=32)
    bundle = export_bundle(ckpt, tmp / "b", precision="int8").bundle.path
    return ["generate", bundle, "hello", "--backend", "torch"], None


def _hf_config(tmp, s, text: str):
    d = Path(shutil.copytree(s.hf, tmp / "src"))
    (d / "config.json").write_text(text)
    return d


def _text_file(tmp, name="notes.txt", text="hello\n"):
    (tmp / name).write_text(text)
    return tmp / name


def _hub_offline(tmp, s, mp):
    """huggingface_hub's own settings, as HF_HUB_OFFLINE=1 and HF_HUB_CACHE set them (read at its import)."""
    import huggingface_hub

    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp / "hf-cache"))
    return ["export", "gptdeploy-tests/not-cached", "-o", tmp / "out"], None


def _llama_config(tmp, s, edit: Callable[[dict], None]) -> Path:
    d = Path(shutil.copytree(s.llama, tmp / "src"))
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    return d


def _yarn(config: dict) -> None:
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}


def _shard_index(tmp, s, edit: Callable[[dict], None]) -> Path:
    """The Llama source with its shard index edited (weight_map: tensor -> shard file)."""
    d = Path(shutil.copytree(s.llama, tmp / "src"))
    index = json.loads((d / SHARD_INDEX).read_text())
    edit(index["weight_map"])
    (d / SHARD_INDEX).write_text(json.dumps(index))
    return d


def _missing_shard(tmp, s, mp):
    d = Path(shutil.copytree(s.llama, tmp / "src"))
    shard = max(json.loads((d / SHARD_INDEX).read_text())["weight_map"].values())
    (d / shard).unlink()
    return ["export", d, "-o", tmp / "out"], None


def _shard_outside(weight_map: dict) -> None:
    first = next(iter(weight_map))
    weight_map[first] = "../elsewhere.safetensors"


RAISING_TEMPLATE = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"


B = "BUNDLE"
CASES = [
    # -- export ------------------------------------------------------------------------------
    Case("export-missing-source", "export MISSING -o OUT", "does not exist",
         lambda t, s, mp: (["export", t / "nope", "-o", t / "out"], None)),
    Case("export-source-is-text-file", "export notes.txt -o OUT", "notes.txt",
         lambda t, s, mp: (["export", _text_file(t), "-o", t / "out"], None)),
    Case("export-unknown-architecture", "export DIR(model_type bert) -o OUT", "bert",
         lambda t, s, mp: (["export", _hf_config(t, s, json.dumps({"model_type": "bert"})), "-o", t / "out"], None)),
    Case("export-config-not-json", "export DIR(config.json garbage) -o OUT", "config.json",
         lambda t, s, mp: (["export", _hf_config(t, s, "{not json"), "-o", t / "out"], None)),
    Case("export-truncated-safetensors", "export DIR(half model.safetensors) -o OUT", "model.safetensors",
         lambda t, s, mp: (["export", _truncated_weights(t, s), "-o", t / "out"], None)),
    Case("export-code-in-ckpt", "export ckpt.pt(pickled os.system) -o OUT", "ckpt.pt",
         _code_in_ckpt),
    Case("export-malicious-meta-pkl", "export ckpt.pt + meta.pkl(pickled os.system) -o OUT", "meta.pkl",
         _malicious_meta),
    Case("export-output-is-a-file", "export SRC -o notes.txt", "is not a directory",
         lambda t, s, mp: (["export", s.hf, "-o", _text_file(t)], None)),
    Case("export-output-parent-is-a-file", "export SRC -o notes.txt/out", "is not a directory",
         lambda t, s, mp: (["export", s.hf, "-o", _text_file(t) / "out"], None)),
    Case("export-two-precisions", "export SRC -o OUT --fp16 --int8", "mutually exclusive",
         lambda t, s, mp: (["export", s.hf, "-o", t / "out", "--fp16", "--int8"], None)),
    Case("export-portable-quantized", "export SRC -o OUT --int8 --portable", "--portable keeps an fp32 graph",
         lambda t, s, mp: (["export", s.hf, "-o", t / "out", "--int8", "--portable"], None)),
    Case("export-eval-text-without-int", "export SRC -o OUT --eval-text notes.txt", "--eval-text is used by",
         lambda t, s, mp: (["export", s.hf, "-o", t / "out", "--eval-text", _text_file(t)], None)),
    Case("export-missing-tokenizer-arg", "export SRC -o OUT --tokenizer MISSING", "nope.json",
         lambda t, s, mp: (["export", s.hf, "-o", t / "out", "--tokenizer", t / "nope.json"], None)),
    Case("export-disk-full", "export SRC -o OUT (onnx.save_model raises ENOSPC)", "no space left on device",
         _disk_full),
    Case("export-unsupported-rope-type", "export DIR(llama, rope_type yarn) -o OUT", "rope_type 'yarn' is not supported",
         lambda t, s, mp: (["export", _llama_config(t, s, _yarn), "-o", t / "out"], None)),
    Case("export-missing-shard", "export DIR(llama, its last shard deleted) -o OUT",
         "which is missing from", _missing_shard),
    Case("export-shard-outside-directory", "export DIR(llama, index names ../elsewhere.safetensors) -o OUT",
         "'../elsewhere.safetensors', which is outside",
         lambda t, s, mp: (["export", _shard_index(t, s, _shard_outside), "-o", t / "out"], None)),
    Case("export-tokenizer-larger-than-embedding", "export SRC(297 rows) -o OUT --tokenizer tiny-llama(2048 tokens)",
         "the tokenizer has 2048 tokens but the model's embedding has only 297 rows",
         lambda t, s, mp: (["export", s.hf, "-o", t / "out", "--tokenizer", SAMPLES / "tiny-llama" / "tokenizer.json"],
                           None)),
    Case("export-hub-id-not-cached-offline", "export org/name -o OUT (HF_HUB_OFFLINE=1, org/name not cached)",
         "is not in the Hugging Face cache", _hub_offline),
    # -- verify ------------------------------------------------------------------------------
    Case("verify-missing-bundle", "verify MISSING", "does not exist",
         lambda t, s, mp: (["verify", t / "nope"], None)),
    Case("verify-bundle-is-a-file", "verify notes.txt", "is not a directory",
         lambda t, s, mp: (["verify", _text_file(t)], None)),
    Case("verify-not-a-bundle", "verify EMPTY_DIR", "gptdeploy.json is missing",
         lambda t, s, mp: (["verify", _mkdir(t / "empty")], None)),
    Case("verify-truncated-manifest", "verify BUNDLE(half gptdeploy.json)", "is not valid JSON",
         lambda t, s, mp: (["verify", _truncate(_copy(s, t), MANIFEST)], None)),
    Case("verify-newer-schema", "verify BUNDLE(schema 99)", "schema 99",
         lambda t, s, mp: (["verify", _with(_copy(s, t), lambda d: d.__setitem__("schema", 99))], None)),
    Case("verify-schema-not-int", "verify BUNDLE(schema \"1\")", "schema must be an integer",
         lambda t, s, mp: (["verify", _with(_copy(s, t), lambda d: d.__setitem__("schema", "1"))], None)),
    Case("verify-altered-graph", "verify BUNDLE(one byte of model.onnx changed)", "does not match its SHA-256",
         lambda t, s, mp: (["verify", _flip_byte(_copy(s, t), "model.onnx")], None)),
    Case("verify-missing-graph", "verify BUNDLE(model.onnx deleted)", "model.onnx is missing",
         lambda t, s, mp: (["verify", _delete(_copy(s, t), "model.onnx")], None)),
    Case("verify-path-leaves-bundle", "verify BUNDLE(tokenizer file ../x)", "leaves the bundle",
         lambda t, s, mp: (["verify", _with(_copy(s, t), _tokenizer_outside)], None)),
    Case("verify-external-data-escapes", "verify BUNDLE(initializer location ../weights.bin) --integrity-only",
         "'../weights.bin'", _escaping_external_data),
    Case("verify-pickle-in-bundle", "verify BUNDLE(+ meta.pkl listed)", "holds no pickles",
         lambda t, s, mp: (["verify", _replace_file(_copy(s, t), "meta.pkl", pickle.dumps({"a": 1}))], None)),
    # -- generate ----------------------------------------------------------------------------
    Case("generate-missing-bundle", "generate MISSING hi", "does not exist",
         lambda t, s, mp: (["generate", t / "nope", "hi"], None)),
    Case("generate-unknown-architecture", "generate BUNDLE(model n_head 3, n_embd 32) hi", "manifest model config",
         lambda t, s, mp: (["generate", _with(_copy(s, t), lambda d: d["model"].__setitem__("n_head", 3)), "hi"],
                           None)),
    Case("generate-truncated-tokenizer", "generate BUNDLE(half tokenizer.json, hash updated) hi",
         "cannot read tokenizer 'tokenizer.json'",
         lambda t, s, mp: (["generate", _truncate(_copy(s, t), "tokenizer.json"), "hi"], None)),
    Case("generate-corrupt-graph", "generate BUNDLE(half model.onnx, hash updated) hi",
         "onnxruntime cannot load graph 'model.onnx'",
         lambda t, s, mp: (["generate", _truncate(_copy(s, t), "model.onnx"), "hi"], None)),
    Case("generate-unreadable-kernel-setting", "generate BUNDLE hi (ORT_GQA_DISABLE_FLASH_ATTENTION=yes set)",
         "ORT_GQA_DISABLE_FLASH_ATTENTION='yes': onnxruntime reads 1",
         lambda t, s, mp: (mp.setenv("ORT_GQA_DISABLE_FLASH_ATTENTION", "yes"), (["generate", s.bundle, "hi"], None))[1]),
    Case("generate-unreadable-tokenizer", "generate BUNDLE(tokenizer.json chmod 000, or a directory as root) hi",
         "tokenizer.json", _unreadable_tokenizer),
    Case("generate-negative-temperature", "generate BUNDLE hi --temperature -1", "temperature must be",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--temperature", "-1"], None)),
    Case("generate-top-p-zero", "generate BUNDLE hi --top-p 0", "top_p must be",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--top-p", "0"], None)),
    Case("generate-zero-new-tokens", "generate BUNDLE hi --max-new-tokens 0", "max_new_tokens must be",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--max-new-tokens", "0"], None)),
    Case("generate-max-new-tokens-not-int", "generate BUNDLE hi --max-new-tokens lots", "'lots' is not a valid integer",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--max-new-tokens", "lots"], None)),
    Case("generate-stream-and-json", "generate BUNDLE hi --stream --json", "cannot be combined",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--stream", "--json"], None)),
    Case("generate-prompt-does-not-fit", "generate BUNDLE (600-character prompt) --max-new-tokens 8",
         "the model's context is 128 positions", lambda t, s, mp: (["generate", s.bundle, "The quick brown fox " * 30, "--max-new-tokens", "8"], None)),
    Case("generate-char-not-in-vocabulary", "generate BUNDLE(nanoGPT meta.pkl characters) héllo",
         "the prompt has characters the model's vocabulary lacks: 'é' (U+00E9)", _char_vocab_prompt),
    Case("generate-torch-on-int8", "generate BUNDLE(--int8) hello --backend torch",
         "the torch runtime runs fp32 and fp16 graphs: use --backend ort", _torch_on_int8),
    Case("generate-non-utf8-stdin", "generate BUNDLE - < (bytes ff fe)", "stdin is not UTF-8",
         lambda t, s, mp: (["generate", s.bundle, "-"], b"\xff\xfeabc")),
    Case("generate-empty-prompt", "generate BUNDLE ''", "prompt is empty",
         lambda t, s, mp: (["generate", s.bundle, ""], None)),
    Case("generate-audit-into-other-file", "generate BUNDLE hi --audit notes.txt", "not a gptdeploy audit log",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--max-new-tokens", "2", "--audit", _text_file(t)], None)),
    Case("generate-unknown-option", "generate BUNDLE hi --temprature 1", "No such option",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--temprature", "1"], None)),
    Case("generate-chat-without-template", "generate BUNDLE(no chat template) hi --chat", "--chat-template FILE",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--chat"], None)),
    Case("generate-chat-template-missing", "generate BUNDLE hi --chat --chat-template MISSING", "does not exist",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--chat", "--chat-template", t / "nope.jinja"], None)),
    Case("generate-chat-template-fails", "generate BUNDLE hi --chat --chat-template t.jinja(raise_exception)",
         "cannot render these messages: Conversation roles must alternate",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--chat", "--chat-template",
                            _text_file(t, "t.jinja", RAISING_TEMPLATE)], None)),
    Case("generate-system-without-chat", "generate BUNDLE hi --system S", "are used with --chat",
         lambda t, s, mp: (["generate", s.bundle, "hi", "--system", "S"], None)),
    # -- chat --------------------------------------------------------------------------------
    Case("chat-without-template", "chat BUNDLE(no chat template) < hi", "--chat-template FILE",
         lambda t, s, mp: (["chat", s.bundle], b"hi\n")),
    Case("chat-template-syntax-error", "chat BUNDLE --chat-template t.jinja(unclosed tag) < hi",
         "has a syntax error on line 1",
         lambda t, s, mp: (["chat", s.bundle, "--chat-template", _text_file(t, "t.jinja", "{% for m in messages %}")],
                           b"hi\n")),
    Case("chat-template-missing", "chat BUNDLE --chat-template MISSING", "does not exist",
         lambda t, s, mp: (["chat", s.bundle, "--chat-template", t / "nope.jinja"], b"hi\n")),
    # -- bench -------------------------------------------------------------------------------
    Case("bench-missing-bundle", "bench MISSING", "does not exist",
         lambda t, s, mp: (["bench", t / "nope"], None)),
    Case("bench-prompt-too-long", "bench BUNDLE --prompt-len 200", "Lower --prompt-len",
         lambda t, s, mp: (["bench", s.bundle, "--backends", "ort", "--prompt-len", "200", "--new-tokens", "4"], None)),
    Case("bench-unknown-backend", "bench BUNDLE --backends nope", "unknown backend 'nope'",
         lambda t, s, mp: (["bench", s.bundle, "--backends", "nope", "--new-tokens", "4"], None)),
    # -- audit -------------------------------------------------------------------------------
    Case("audit-missing-log", "audit verify MISSING", "does not exist",
         lambda t, s, mp: (["audit", "verify", t / "nope.log"], None)),
    Case("audit-not-a-log", "audit show notes.txt", "not a gptdeploy audit log",
         lambda t, s, mp: (["audit", "show", _text_file(t)], None)),
    # A log cut short or damaged is exit 1 for `audit verify` by design (it reports what it found; see
    # tests/test_audit.py); reading a damaged record is an error.
    Case("audit-export-damaged-record", "audit export LOG(first 8 bytes zeroed) --record 0 --format bertviz -o x.npz",
         "record at position 0", lambda t, s, mp: (["audit", "export", _damaged_head(s.log, t, 8), "--record", "0",
                                                    "--format", "bertviz", "-o", t / "x.npz"], None)),
    Case("audit-report-damaged-record", "audit report LOG(first 8 bytes zeroed) --record 0 -o r.html",
         "is damaged or altered", lambda t, s, mp: (["audit", "report", _damaged_head(s.log, t, 8), "--record", "0",
                                                     "-o", t / "r.html"], None)),
    Case("audit-log-is-a-directory", "audit verify DIR", "is a directory",
         lambda t, s, mp: (["audit", "verify", _mkdir(t / "d")], None)),
    Case("audit-report-no-output", "audit report LOG", "give -o REPORT.html, --png DIR, or both",
         lambda t, s, mp: (["audit", "report", s.log], None)),
    Case("audit-export-record-missing", "audit export LOG --record 7 --format bertviz -o x.npz",
         "there is no record 7",
         lambda t, s, mp: (["audit", "export", s.log, "--record", "7", "--format", "bertviz", "-o", t / "x.npz"],
                           None)),
    # -- build-engine ------------------------------------------------------------------------
    Case("build-engine-missing-bundle", "build-engine MISSING", "does not exist",
         lambda t, s, mp: (["build-engine", t / "nope"], None)),
    Case("build-engine-zero-batch", "build-engine BUNDLE --max-batch 0", "--max-batch",
         lambda t, s, mp: (["build-engine", s.bundle, "--max-batch", "0"], None)),
    Case("build-engine-context-1", "build-engine BUNDLE --max-context 1", "below 2",
         lambda t, s, mp: (["build-engine", s.bundle, "--max-context", "1"], None)),
    Case("build-engine-context-too-long", "build-engine BUNDLE --max-context 100000", "100000",
         lambda t, s, mp: (["build-engine", s.bundle, "--max-context", "100000"], None)),
    Case("build-engine-zero-workspace", "build-engine BUNDLE --workspace-gb 0", "--workspace-gb",
         lambda t, s, mp: (["build-engine", s.bundle, "--workspace-gb", "0"], None)),
    Case("build-engine-no-graph", "build-engine BUNDLE(fp32 only) --graph fp16", "fp16",
         lambda t, s, mp: (["build-engine", s.bundle, "--graph", "fp16"], None)),
    Case("build-engine-fused-graph", "build-engine BUNDLE(fp32 fused for onnxruntime)", "export the model with --fp16, or --portable",
         lambda t, s, mp: (["build-engine", _with(_copy(s, t), _fused)], None)),
]


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _with(bundle: Path, edit) -> Path:
    _edit_manifest(bundle, edit)
    return bundle


def _truncate(bundle: Path, name: str) -> Path:
    if name == MANIFEST:
        (bundle / name).write_bytes(_half(bundle / name))
        return bundle
    return _replace_file(bundle, name, _half(bundle / name))


def _flip_byte(bundle: Path, name: str) -> Path:
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / name).write_bytes(bytes(data))
    return bundle


def _delete(bundle: Path, name: str) -> Path:
    (bundle / name).unlink()
    return bundle


def _fused(d: dict) -> None:
    d["parity"].setdefault("fp32", {}).setdefault("graph", {})["fused"] = True


def _tokenizer_outside(d: dict) -> None:
    d["tokenizer"]["file"] = "../x"
    d["files"]["../x"] = "0" * 64


def _damaged_head(log: Path, tmp: Path, n: int) -> Path:
    (tmp / "damaged.log").write_bytes(b"\x00" * n + log.read_bytes()[n:])
    return tmp / "damaged.log"


def _truncated_weights(tmp: Path, s: Shared) -> Path:
    d = Path(shutil.copytree(s.hf, tmp / "src"))
    (d / "model.safetensors").write_bytes(_half(d / "model.safetensors"))
    return d


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    from gptdeploy.audit import append_records
    from tests.audit_records import synthetic_record
    from tests.factories import make_hf_dir, make_hf_gpt2_dir
    from tests.runtime_bundles import made

    root = tmp_path_factory.mktemp("bad-inputs")
    hf = make_hf_gpt2_dir(root / "hf", n_layer=1, n_head=2, n_embd=16, n_positions=32, seed=3)
    llama = make_hf_dir(root / "llama", "llama", n_layer=2, max_shard_size="40KB")
    assert len(set(json.loads((llama / SHARD_INDEX).read_text())["weight_map"].values())) >= 2
    log = root / "two.log"
    append_records(log, [synthetic_record(0), synthetic_record(1)])
    return Shared(made("small").bundle, hf, log, llama)


def _tree(*dirs: Path) -> dict[str, str]:
    """Every path under `dirs` with its content hash (dirs as "dir"): detects any write."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            try:
                out[str(p)] = "dir" if p.is_dir() else sha256_file(p) if p.is_file() else "other"
            except PermissionError:
                out[str(p)] = "unreadable"
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, shared, tmp_path, monkeypatch):
    args, stdin = case.build(tmp_path, shared, monkeypatch)
    before = _tree(tmp_path, shared.bundle, shared.log.parent)
    r = CliRunner().invoke(cli, [str(a) for a in args], input=stdin)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert case.fragment in lines[0], lines[0]
    assert "Traceback" not in r.output and r.stdout == ""
    assert _tree(tmp_path, shared.bundle, shared.log.parent) == before  # nothing half-written
    assert not (tmp_path / "pwned").exists()  # nothing executed


def test_at_least_30_cases_cover_every_command():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split("-")[0] for c in CASES} >= {"export", "verify", "generate", "bench", "audit", "build"}


def doc_table() -> str:
    rows = ["| case | command | the error line contains |", "|---|---|---|"]
    rows += [f"| `{c.id}` | `gptdeploy {c.command}` | `{c.fragment}` |" for c in CASES]
    return "\n".join(rows) + "\n"


def test_the_doc_table_lists_every_case():
    """docs/bad-inputs.md must hold exactly this table (regenerate: python -m tests.test_bad_inputs)."""
    assert doc_table() in DOC.read_text(encoding="utf-8"), "docs/bad-inputs.md is out of date"


if __name__ == "__main__":
    print(doc_table(), end="")
