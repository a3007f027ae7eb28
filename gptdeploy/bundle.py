"""The deploy bundle: a directory with a versioned manifest (`gptdeploy.json`, whose classes
live in gptdeploy.manifest), checked on load.

Torch-free: the runtime loads bundles. Every file the manifest names is confined to the
bundle directory and its SHA-256 is checked; an unknown schema is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from gptdeploy.config import GPTConfig
from gptdeploy.errors import BundleError
from gptdeploy.hashing import sha256_file
from gptdeploy.manifest import MANIFEST, GraphEntry, Manifest

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib")


def pickle_kind(relative: str, path: Path) -> str | None:
    """Why `path` looks like a pickle (by name, pickle header, or torch.save's zip), or None.

    Not applied to external tensor data: raw weights may begin with any bytes."""
    if relative.lower().endswith(PICKLE_SUFFIXES):
        return f"named like a pickle ({Path(relative).suffix})"
    with open(path, "rb") as f:
        head = f.read(4096)
        if not head:
            return None
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    # Protocol 2-5 pickles open with PROTO (0x80, version) and end with STOP ('.').
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and last == b".":
        return f"a pickle (protocol {head[1]})"
    if head.startswith(b"PK\x03\x04") and b".pkl" in head[:512]:
        return "a torch.save archive (a zip holding a pickle)"
    return None


def confined(root: Path, relative: str) -> Path:
    """Resolve `relative` inside `root`, refusing absolute paths, `..` and escaping symlinks."""
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"bundle file name must be a non-empty string, got {relative!r}")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or ":" in relative:
        raise BundleError(f"bundle file {relative!r} is an absolute path; files must stay inside the bundle")
    if ".." in Path(relative).parts or "\\" in relative:
        raise BundleError(f"bundle file {relative!r} leaves the bundle directory")
    root_real = root.resolve()
    target = (root / relative).resolve()
    if root_real != target and root_real not in target.parents:
        raise BundleError(f"bundle file {relative!r} resolves outside the bundle (symlink?)")
    return target


@dataclass
class Bundle:
    """A loaded, checked bundle directory."""

    path: Path
    manifest: Manifest
    manifest_sha256: str

    @classmethod
    def load(cls, path: str | os.PathLike, verify_hashes: bool = True) -> Bundle:
        """Read and check a bundle. `verify_hashes=False` skips only the SHA-256 of file contents
        (for very large bundles); presence, confinement and schema are always checked."""
        root = Path(path)
        if not root.exists():
            raise BundleError(f"bundle {root} does not exist")
        if not root.is_dir():
            raise BundleError(f"bundle {root} is not a directory")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{root} is not a gptdeploy bundle: {MANIFEST} is missing")
        try:
            raw = mpath.read_bytes()
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath} is not valid JSON: {exc}") from None
        except OSError as exc:
            raise BundleError(f"cannot read {mpath}: {exc.strerror}") from None
        manifest = Manifest.from_dict(data)
        bundle = cls(root, manifest, hashlib.sha256(raw).hexdigest())
        bundle._check_files(verify_hashes)
        return bundle

    def _check_files(self, verify_hashes: bool) -> None:
        m = self.manifest
        needed = {m.tokenizer.file} | {g.file for g in m.graphs.values()}
        needed |= {m.tokenizer.chat_template} if m.tokenizer.chat_template else set()
        needed |= {g.data_file for g in m.graphs.values() if g.data_file}
        unlisted = sorted(needed - set(m.files))
        if unlisted:
            raise BundleError(f"manifest does not list a SHA-256 for {', '.join(unlisted)}")
        targets = {rel: confined(self.path, rel) for rel in sorted(m.files)}
        missing = [f"{rel} is missing" for rel, target in targets.items() if not target.is_file()]
        if missing:
            raise BundleError(f"bundle {self.path}: " + "; ".join(missing))
        # Before any hash is read, and so before any runtime opens a graph: nothing may point
        # outside the bundle, and nothing in it may be a pickle (style rule 9).
        data_files = self._check_graph_refs() | {g.data_file for g in m.graphs.values() if g.data_file}
        for rel, target in targets.items():
            try:
                why = None if rel in data_files else pickle_kind(rel, target)
            except OSError as exc:
                raise BundleError(f"cannot read bundle file {rel!r}: {exc.strerror or exc}") from None
            if why:
                raise BundleError(f"bundle file {rel!r} is {why}; a bundle holds no pickles (nothing may execute on load)")
        if verify_hashes:
            altered = [rel for rel, target in targets.items() if sha256_file(target) != m.files[rel]]
            if altered:
                raise BundleError(f"bundle {self.path}: " + "; ".join(
                    f"{rel} does not match its SHA-256 (altered or corrupt)" for rel in altered))
        else:
            log.warning("bundle %s: SHA-256 of %d files not checked (verify_hashes=False)", self.path, len(m.files))

    def _check_graph_refs(self) -> set[str]:
        """Check every external-data location of every graph; returns them, bundle-relative."""
        from gptdeploy.graph_refs import GraphParseError, external_data_refs

        found: set[str] = set()
        for rel in sorted({g.file for g in self.manifest.graphs.values()}):
            try:
                refs = external_data_refs(confined(self.path, rel))
            except GraphParseError as exc:
                # Not protobuf at all: onnxruntime cannot parse it either, and says so when it
                # opens the graph (test_bundle's stand-in graphs are such files).
                log.debug("graph %s is not protobuf (%s); no external data to check", rel, exc)
                continue
            except OSError as exc:
                raise BundleError(f"cannot read graph {rel!r}: {exc.strerror or exc}") from None
            for ref in refs:
                found.add(self._check_ref(rel, ref.tensor, ref.location))
        return found

    def _check_ref(self, graph: str, tensor: str, location: str) -> str:
        where = f"graph {graph!r} tensor {tensor!r} reads external data from {location!r}"
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
            raise BundleError(f"{where}, an absolute or empty path; external data must stay inside the bundle")
        if ".." in Path(location).parts or "\\" in location:
            raise BundleError(f"{where}, which leaves the bundle directory")
        rel = (Path(graph).parent / location).as_posix()
        try:
            confined(self.path, rel)
        except BundleError:
            raise BundleError(f"{where}, which resolves outside the bundle (symlink?)") from None
        if rel not in self.manifest.files:
            raise BundleError(f"{where}, a file the manifest does not list (so its SHA-256 is unchecked)")
        return rel

    def file(self, relative: str) -> Path:
        return confined(self.path, relative)

    def graph(self, name: str | None = None) -> GraphEntry:
        """The named graph, or the default: fp32 if present, else the first listed."""
        graphs = self.manifest.graphs
        if name is None:
            return graphs.get("fp32") or next(iter(graphs.values()))
        if name not in graphs:
            raise BundleError(f"bundle has no graph {name!r}; it has {', '.join(graphs)}")
        return graphs[name]

    @property
    def config(self) -> GPTConfig:
        return self.manifest.config


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write the manifest (files must already be listed with their hashes)."""
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
