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
            sig = GraphSignature(
                n_layer=config.n_layer,
                n_head=config.n_head,
                kv_heads=config.kv_heads,
                head_dim=config.head_dim,
                vocab_size=config.vocab_size,
                kv_dtype=str(d["kv_dtype"]),
                attentions=bool(d["attentions"]),
                last_logits_only=bool(d["last_logits_only"]),
            )
            return cls(name, str(d["file"]), str(d["precision"]), sig, d.get("data_file"))
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
            engines=list(d.get("engines", []) or []),
            created=str(d.get("created", "")),
        )


def _int(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BundleError(f"manifest field {what} must be a non-negative integer, got {v!r}")
    return v


def _opt_int(v: object, what: str) -> int | None:
    return None if v is None else _int(v, what)


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
        problems = []
        for rel, digest in sorted(m.files.items()):
            target = confined(self.path, rel)
            if not target.is_file():
                problems.append(f"{rel} is missing")
            elif verify_hashes and sha256_file(target) != digest:
                problems.append(f"{rel} does not match its SHA-256 (altered or corrupt)")
        if problems:
            raise BundleError(f"bundle {self.path}: " + "; ".join(problems))
        if not verify_hashes:
            log.warning("bundle %s: SHA-256 of %d files not checked (verify_hashes=False)", self.path, len(m.files))

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
