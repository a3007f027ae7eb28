"""Bundles for the runtime and generation tests, built once per pytest process.

`export_bundle` re-runs parity against transformers on every export (~15 s a bundle on two
cores, measured); these tests check parity themselves, token for token, so they write the
same bundle layout without that step: the source loader, the ONNX exporter and the manifest
classes that export_bundle uses.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptdeploy.bundle import write_manifest
from gptdeploy.hashing import sha256_file
from gptdeploy.manifest import GraphEntry, Manifest
from gptdeploy.steps import positions
from tests.factories import make_hf_gpt2_dir

GRAPH_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "samples" / "tiny-gpt"


@dataclass(frozen=True)
class Made:
    hf_dir: Path  # the transformers source directory
    bundle: Path


# Two random-init GPT-2s: the factory default (vocab = tokenizer's 297), and a wider one whose
# 320 embedding rows leave 23 padding columns that must never be sampled (as nanoGPT's 50304).
CONFIGS = {
    "small": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128, "seed": 0},
    "padded": {"n_layer": 3, "n_head": 4, "n_embd": 64, "vocab_size": 320, "n_positions": 96, "seed": 1},
}

_ROOT: Path | None = None
_MADE: dict[tuple[str, bool], Made] = {}


def made(name: str, attentions: bool = True) -> Made:
    global _ROOT
    key = (name, attentions)
    if key not in _MADE:
        if _ROOT is None:
            _ROOT = Path(tempfile.mkdtemp(prefix="gptdeploy-rt-"))
            import atexit

            atexit.register(shutil.rmtree, _ROOT, True)
        hf_dir = _ROOT / f"hf-{name}"
        if not hf_dir.exists():
            make_hf_gpt2_dir(hf_dir, **CONFIGS[name])
        out = _ROOT / f"bundle-{name}{'' if attentions else '-noatt'}"
        write_bundle(hf_dir, out, attentions=attentions)
        _MADE[key] = Made(hf_dir, out)
    return _MADE[key]


def write_bundle(source_dir: Path, out: Path, attentions: bool = True) -> Path:
    """export_bundle's layout and manifest, without its parity run."""
    from gptdeploy.exporters.onnx import export_onnx
    from gptdeploy.exporters.sources import load_source
    from gptdeploy.exporters.sources.tokenizer_files import write_bundle_files
    from gptdeploy.exporters.weights_map import graph_weights
    from gptdeploy.modeling import GPT, load_state

    source = load_source(source_dir)
    model = GPT(source.config)
    load_state(model, source.state)
    out.mkdir(parents=True)
    sig, data_file = export_onnx(model.eval(), out / GRAPH_FILE, attentions=attentions)
    tok_entry, tok_files = write_bundle_files(source.tokenizer, out, TOKENIZER_FILE)
    files = [GRAPH_FILE, *tok_files] + ([data_file] if data_file else [])
    manifest = Manifest(
        config=source.config,
        graphs={"fp32": GraphEntry("fp32", GRAPH_FILE, "fp32", sig, data_file,
                                   graph_weights(source.config, source.state, "fp32", out / GRAPH_FILE))},
        tokenizer=tok_entry,
        files={f: sha256_file(out / f) for f in files},
        source={"kind": source.kind},
    )
    write_manifest(out, manifest)
    return out


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def left_padded(lengths, vocab, seed=0):
    """Random ids (B, L) with rows left-padded to the longest length, their mask and positions."""
    rng = np.random.default_rng(seed)
    B, L = len(lengths), max(lengths)
    ids = rng.integers(0, vocab, size=(B, L))
    mask = np.zeros((B, L), dtype=np.int64)
    for b, n in enumerate(lengths):
        mask[b, L - n :] = 1
    return ids, mask, positions(mask)


def greedy_steps(rt, ids, mask, pos, n_steps: int, record: bool):
    """Prefill then greedy decode steps, feeding every row its argmax; the StepOutputs."""
    outs = [rt.prefill(ids, mask, pos, record)]
    for _ in range(n_steps):
        nxt = outs[-1].logits.argmax(axis=1)[:, None]
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        outs.append(rt.decode(nxt, mask, pos, record))
    return outs
