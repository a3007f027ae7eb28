"""Hub ids as export sources (exporters/sources/hub.py), offline, against a Hugging Face cache the
test lays out exactly as huggingface_hub does: models--org--name/{blobs, refs/main,
snapshots/<commit>/...} with relative symlinks from the snapshot to the blobs. No network: online
downloads are a fake snapshot_download that fills the same cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from gptdeploy.errors import SourceError
from gptdeploy.exporters.sources import hub

huggingface_hub = pytest.importorskip("huggingface_hub")

REPO = "org/tiny-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMPLETE = {
    "config.json": b'{"model_type": "gpt2"}',
    "generation_config.json": b'{"eos_token_id": [1, 2]}',
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "model.safetensors": b"weights",
}


def lay_out(cache: Path, files: dict[str, bytes], repo: str = REPO, commit: str = COMMIT, ref: str | None = "main",
            tree: dict[str, bytes] | None = None) -> Path:
    """A repo in `cache` as huggingface_hub writes it; returns the snapshot directory. `tree`: the
    repo's full file list, written as huggingface_hub 2.x's cached tree listing."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    if tree is not None:
        (folder / "trees").mkdir(exist_ok=True)
        listing = {n: {"size": len(d), "blob_id": hashlib.sha1(d).hexdigest()} for n, d in tree.items()}
        (folder / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snap


def _resolve(spec: str, cache: Path) -> Path:
    return hub.resolve(spec, offline=True, cache_dir=cache)


def test_a_complete_cached_snapshot_is_found_by_branch_commit_and_default(tmp_path):
    snap = lay_out(tmp_path, COMPLETE)
    for spec in (REPO, f"{REPO}@main", f"{REPO}@{COMMIT}"):
        got = _resolve(spec, tmp_path)
        assert got == snap, spec
        assert (got / "config.json").read_bytes() == COMPLETE["config.json"]  # through the symlink


def test_huggingface_hubs_own_settings_choose_cache_and_offline_mode(tmp_path, monkeypatch):
    snap = lay_out(tmp_path, COMPLETE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub.resolve(REPO) == snap


def test_a_missing_file_is_named_with_the_command_that_fetches_it(tmp_path):
    lay_out(tmp_path, {k: v for k, v in COMPLETE.items() if k != "model.safetensors"})
    with pytest.raises(SourceError) as err:
        _resolve(REPO, tmp_path)
    msg = str(err.value)
    assert "lacks model.safetensors" in msg and "HF_HUB_OFFLINE" in msg
    assert f"hf download {REPO} model.safetensors" in msg and "models--org--tiny-model" in msg
    assert "\n" not in msg


def test_a_missing_shard_of_a_sharded_checkpoint_is_named(tmp_path):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    files = {k: v for k, v in COMPLETE.items() if k != "model.safetensors"}
    files |= {"model.safetensors.index.json": json.dumps(index).encode(), "model-00001-of-00002.safetensors": b"1"}
    lay_out(tmp_path, files)
    with pytest.raises(SourceError, match=r"lacks model-00002-of-00002\.safetensors and"):
        _resolve(REPO, tmp_path)
    lay_out(tmp_path, {"model-00002-of-00002.safetensors": b"2"})
    assert (_resolve(REPO, tmp_path) / "model-00002-of-00002.safetensors").is_file()


def test_pytorch_bin_is_used_when_there_are_no_safetensors(tmp_path):
    files = {k: v for k, v in COMPLETE.items() if k != "model.safetensors"} | {"pytorch_model.bin": b"pickle"}
    lay_out(tmp_path, files)
    assert (_resolve(REPO, tmp_path) / "pytorch_model.bin").is_file()


@pytest.mark.skipif(not hasattr(huggingface_hub, "get_cached_repo_tree"), reason="huggingface_hub < 2 keeps no tree listing")
def test_files_the_cached_tree_lists_but_the_snapshot_lacks_are_named(tmp_path):
    """generation_config.json is optional in general, but the cached listing says this repo has it
    (its EOS ids decide where generation stops), so it is missing, not absent."""
    lay_out(tmp_path, {k: v for k, v in COMPLETE.items() if k != "generation_config.json"}, tree=COMPLETE)
    with pytest.raises(SourceError, match="lacks generation_config.json"):
        _resolve(REPO, tmp_path)


def test_a_revision_that_is_not_cached_names_the_cached_ones(tmp_path):
    lay_out(tmp_path, COMPLETE)
    with pytest.raises(SourceError) as err:
        _resolve(f"{REPO}@v2", tmp_path)
    msg = str(err.value)
    assert f"{REPO}@v2 is not in the Hugging Face cache" in msg and "(cached revisions: main)" in msg
    assert f"hf download {REPO} --revision v2" in msg and "HF_HUB_OFFLINE" in msg


def test_a_repo_that_is_not_cached_says_how_to_get_it(tmp_path):
    with pytest.raises(SourceError) as err:
        _resolve("other/model", tmp_path)
    msg = str(err.value)
    assert "other/model is not in the Hugging Face cache" in msg
    assert 'hf download other/model --include "*.json"' in msg and "models--other--model" in msg


@pytest.mark.parametrize("spec", ["org/na me", "org--x/y", "a/b/c", "/abs/path", "org/", "org/name.git",
                                  "-org/name", "org/name@", "org/../x", "name"])
def test_a_malformed_id_is_refused_and_does_not_look_like_one(spec, tmp_path):
    assert not hub.looks_like_hub_id(spec)
    with pytest.raises(SourceError, match="is not a Hugging Face hub id"):
        _resolve(spec, tmp_path)


def test_an_existing_path_never_looks_like_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "qwen").mkdir(parents=True)
    assert not hub.looks_like_hub_id("out/qwen")
    assert hub.looks_like_hub_id("Qwen/Qwen2.5-0.5B") and hub.looks_like_hub_id("meta-llama/Llama-3.2-1B@refs/pr/1")
    assert hub.parse("Qwen/Qwen2.5-0.5B@v1.0") == hub.HubId("Qwen/Qwen2.5-0.5B", "v1.0")


class FakeHub:
    """snapshot_download over a fake repo: fills the cache like the real one and records the patterns."""

    def __init__(self, cache: Path, repo_files: dict[str, bytes]):
        self.cache, self.repo_files, self.asked = cache, repo_files, []

    def __call__(self, repo_id, *, revision=None, allow_patterns=None, cache_dir=None, local_files_only=False):
        import fnmatch

        assert not local_files_only and Path(cache_dir) == self.cache
        self.asked.append(list(allow_patterns))
        chosen = {n: d for n, d in self.repo_files.items() if any(fnmatch.fnmatch(n, p) for p in allow_patterns)}
        return str(lay_out(self.cache, chosen, repo=repo_id))


def test_online_only_the_files_export_reads_are_downloaded(tmp_path, monkeypatch):
    repo = COMPLETE | {"pytorch_model.bin": b"old", "consolidated.safetensors": b"copy", "README.md": b"#"}
    fake = FakeHub(tmp_path, repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    snap = hub.resolve(REPO, offline=False, cache_dir=tmp_path)
    assert sorted(p.name for p in snap.iterdir()) == sorted(COMPLETE)  # no .bin, no second copy, no README
    assert all("pytorch_model.bin" not in asked for asked in fake.asked)


def test_online_a_repo_without_safetensors_gets_its_bin_shards(tmp_path, monkeypatch):
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    repo = {k: v for k, v in COMPLETE.items() if k != "model.safetensors"} | {
        "pytorch_model.bin.index.json": json.dumps(index).encode(),
        "pytorch_model-00001-of-00002.bin": b"1", "pytorch_model-00002-of-00002.bin": b"2"}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tmp_path, repo))
    snap = hub.resolve(REPO, offline=False, cache_dir=tmp_path)
    assert hub.needed(snap) == [] and (snap / "pytorch_model-00002-of-00002.bin").is_file()


def test_online_a_repo_that_is_no_model_says_what_it_lacks(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tmp_path, {"README.md": b"#"}))
    with pytest.raises(SourceError, match=r"has no config.json, tokenizer.json, model.safetensors; is it a transformers"):
        hub.resolve(REPO, offline=False, cache_dir=tmp_path)
