"""The deploy bundle: a directory with a versioned manifest (`gptdeploy.json`), checked on load.

Torch-free: the runtime loads bundles. Every file the manifest names is confined to the
bundle directory and its SHA-256 is checked; an unknown schema is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy.config import GPTConfig
from gptdeploy.contract import GraphSignature
from gptdeploy.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

MANIFEST = "gptdeploy.json"
SCHEMA = 1
FORMAT = "gptdeploy-bundle"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX graph in the bundle."""

    name: str  # "fp32", "fp16", "int8", ...
    file: str
    precision: str
    signature: GraphSignature
    data_file: str | None = None  # external weights, when the graph passes 2 GB or was asked to

    def to_dict(self) -> dict:
        s = self.signature
        return {
            "file": self.file,
            "data_file": self.data_file,
            "precision": self.precision,
            "kv_dtype": s.kv_dtype,
            "attentions": s.attentions,
            "last_logits_only": s.last_logits_only,
            "io": s.to_dict(),
        }

    @classmethod
    def from_dict(cls, name: str, d: dict, config: GPTConfig) -> GraphEntry:
        try:
            sig = GraphSignature.for_config(
                config,
                kv_dtype=str(d["kv_dtype"]),
                attentions=bool(d["attentions"]),
                last_logits_only=bool(d["last_logits_only"]),
            )
            data_file = d.get("data_file")
            if data_file is not None and not isinstance(data_file, str):
                raise TypeError(f"data_file must be a file name, got {data_file!r}")
            return cls(name, str(d["file"]), str(d["precision"]), sig, data_file)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest graph {name!r} is malformed: missing or bad field {exc}") from None


@dataclass(frozen=True)
class TokenizerEntry:
    file: str
    vocab_size: int  # tokens the tokenizer knows; logits past this are padding rows
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Manifest:
    config: GPTConfig
    graphs: dict[str, GraphEntry]
    tokenizer: TokenizerEntry
    files: dict[str, str]  # relative path -> sha256
    source: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    engines: list = field(default_factory=list)
    created: str = ""

    @property
    def max_context(self) -> int:
        return self.config.block_size

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "format": FORMAT,
            "created": self.created,
            "model": self.config.to_dict(),
            "limits": {"max_context": self.max_context},
            "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
            "tokenizer": self.tokenizer.to_dict(),
            "files": dict(sorted(self.files.items())),
            "source": self.source,
            "tools": self.tools,
            "parity": self.parity,
            "engines": self.engines,
        }

    @classmethod
    def from_dict(cls, d: object) -> Manifest:
        if not isinstance(d, dict):
            raise BundleError("manifest is not a JSON object")
        schema = d.get("schema")
        if d.get("format") != FORMAT:
            raise BundleError(f"not a gptdeploy bundle manifest (format {d.get('format')!r})")
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise BundleError(f"manifest schema must be an integer, got {schema!r}")
        if schema > SCHEMA:
            raise BundleError(
                f"bundle uses manifest schema {schema}; this gptdeploy reads schema {SCHEMA}. "
                "Upgrade gptdeploy to load it."
            )
        if schema < 1:
            raise BundleError(f"unknown manifest schema {schema}")
        try:
            config = GPTConfig.from_dict(d["model"])
            graphs_raw = d["graphs"]
            tok = d["tokenizer"]
            files = d["files"]
            if not isinstance(graphs_raw, dict) or not graphs_raw:
                raise BundleError("manifest lists no graphs")
            if not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items()
            ):
                raise BundleError("manifest 'files' must map file names to SHA-256 strings")
            if not isinstance(tok, dict):
                raise BundleError("manifest 'tokenizer' must be an object")
            graphs = {
                str(k): GraphEntry.from_dict(str(k), v if isinstance(v, dict) else {}, config)
                for k, v in graphs_raw.items()
            }
            tokenizer = TokenizerEntry(
                file=str(tok["file"]),
                vocab_size=_int(tok["vocab_size"], "tokenizer.vocab_size"),
                eos_token_id=_opt_int(tok.get("eos_token_id"), "eos_token_id"),
                bos_token_id=_opt_int(tok.get("bos_token_id"), "bos_token_id"),
                pad_token_id=_opt_int(tok.get("pad_token_id"), "pad_token_id"),
            )
        except ConfigError as exc:
            raise BundleError(f"manifest model config: {exc}") from None
        except KeyError as exc:
            raise BundleError(f"manifest is missing field {exc}") from None
        except (TypeError, AttributeError, ValueError) as exc:
            raise BundleError(f"manifest is malformed: {exc}") from None
        if tokenizer.vocab_size > config.vocab_size:
            raise BundleError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size} rows"
            )
        return cls(
            config=config,
            graphs=graphs,
            tokenizer=tokenizer,
            files=dict(files),
            source=_obj(d.get("source", {})),
            tools=_obj(d.get("tools", {})),
            parity=_obj(d.get("parity", {})),
            engines=_list(d.get("engines", []), "engines"),
            created=str(d.get("created", "")),
        )


def _int(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BundleError(f"manifest field {what} must be a non-negative integer, got {v!r}")
    return v


def _opt_int(v: object, what: str) -> int | None:
    return None if v is None else _int(v, what)


def _list(v: object, what: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise BundleError(f"manifest field {what} must be a list, got {type(v).__name__}")
    return list(v)


def _obj(v: object) -> dict:
    return v if isinstance(v, dict) else {}


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
