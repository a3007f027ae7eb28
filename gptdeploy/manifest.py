"""The bundle manifest (`gptdeploy.json`): its entries and their strict parsing, schema 1.

Pure data: no file access (gptdeploy.bundle loads, checks and writes bundles).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptdeploy.config import GPTConfig
from gptdeploy.contract import GraphSignature
from gptdeploy.errors import BundleError, ConfigError

MANIFEST = "gptdeploy.json"
SCHEMA = 1
FORMAT = "gptdeploy-bundle"
QUANTIZED = ("int8", "int4")  # precisions whose graphs hold their Linear weights only quantized


@dataclass(frozen=True)
class WeightRef:
    """Where one canonical parameter (gptdeploy.modeling.GPT's state-dict name) lies in a graph."""

    initializer: str  # the graph initializer holding its values (several parameters may share one)
    transposed: bool = False  # stored as the parameter's transpose (a Linear weight as MatMul's [in, out])

    def to_dict(self) -> dict:
        return {"initializer": self.initializer, "transposed": self.transposed}

    @classmethod
    def from_dict(cls, d: object) -> WeightRef | None:
        """None when `d` is not {"initializer": str, "transposed": bool}."""
        if not isinstance(d, dict) or not isinstance(d.get("initializer"), str):
            return None
        transposed = d.get("transposed", False)
        return cls(d["initializer"], transposed) if isinstance(transposed, bool) else None


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX graph in the bundle."""

    name: str  # "fp32", "fp16", "int8", ...
    file: str
    precision: str
    signature: GraphSignature
    data_file: str | None = None  # external weights, when the graph passes 2 GB or was asked to
    # Canonical parameter name -> its initializer: how the `torch` runtime rebuilds the model from
    # any graph, fused or not. Optional (bundles written before it have none); None for int8/int4
    # graphs, which hold no float weights to rebuild from. Left out of the hash: a dict has none.
    weights: dict[str, WeightRef] | None = field(default=None, hash=False)
    # The graph's attention op may write the KV cache in place: a runtime can bind one buffer with
    # spare capacity (B, nkv, capacity, hs) as both past_key_values.{i}.* and present.{i}.*, and
    # only the new positions are written (com.microsoft.GroupQueryAttention). Without such a
    # binding the graph follows the contract (present = past + new). Optional: absent means False.
    kv_shared_buffer: bool = False

    def to_dict(self) -> dict:
        s = self.signature
        d = {
            "file": self.file,
            "data_file": self.data_file,
            "precision": self.precision,
            "kv_dtype": s.kv_dtype,
            "attentions": s.attentions,
            "last_logits_only": s.last_logits_only,
            "io": s.to_dict(),
        }
        if self.weights is not None:
            d["weights"] = {k: ref.to_dict() for k, ref in self.weights.items()}
        if self.kv_shared_buffer:
            d["kv_shared_buffer"] = True
        return d

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
            shared = d.get("kv_shared_buffer", False)
            if not isinstance(shared, bool):
                raise TypeError(f"kv_shared_buffer must be true or false, got {shared!r}")
            return cls(name, str(d["file"]), str(d["precision"]), sig, data_file, _weights(name, d.get("weights")), shared)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest graph {name!r} is malformed: missing or bad field {exc}") from None


@dataclass(frozen=True)
class TokenizerEntry:
    """The bundle's tokenizer and how generation uses it. Every field after pad_token_id is
    optional in the manifest (bundles written before them load with the defaults)."""

    file: str
    vocab_size: int  # tokens the tokenizer knows; logits past this are padding rows
    eos_token_id: int | None = None  # the primary EOS: the first of eos_token_ids
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    # Every id that ends a generation: Llama 3 lists <|end_of_text|>, <|eom_id|>, <|eot_id|>; Qwen
    # <|im_end|>, <|endoftext|> (their generation_config.json).
    eos_token_ids: tuple[int, ...] = ()
    add_bos_token: bool = False  # gptdeploy prepends bos_token_id (tokenizer.json's post-processor does not)
    chat_template: str | None = None  # bundle file holding the Jinja chat template
    # Named special tokens as text (bos_token, eos_token, ...): the chat template reads them.
    special_tokens: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a generation; none when eos_token_id is None (so clearing it, as a
        benchmark does to decode every requested token, clears them all)."""
        if self.eos_token_id is None:
            return ()
        return tuple(dict.fromkeys((self.eos_token_id, *self.eos_token_ids)))

    def to_dict(self) -> dict:
        return {**self.__dict__, "eos_token_ids": list(self.eos_token_ids), "special_tokens": dict(self.special_tokens)}

    @classmethod
    def from_dict(cls, tok: dict) -> TokenizerEntry:
        ids = _list(tok.get("eos_token_ids"), "tokenizer.eos_token_ids")
        add_bos = tok.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise BundleError(f"manifest field tokenizer.add_bos_token must be true or false, got {add_bos!r}")
        template = tok.get("chat_template")
        if template is not None and (not isinstance(template, str) or not template):
            raise BundleError(f"manifest field tokenizer.chat_template must be a file name or null, got {template!r}")
        special = tok.get("special_tokens", {})
        if not isinstance(special, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in special.items()
        ):
            raise BundleError("manifest field tokenizer.special_tokens must map token names to strings")
        return cls(
            file=str(tok["file"]),
            vocab_size=_int(tok["vocab_size"], "tokenizer.vocab_size"),
            eos_token_id=_opt_int(tok.get("eos_token_id"), "eos_token_id"),
            bos_token_id=_opt_int(tok.get("bos_token_id"), "bos_token_id"),
            pad_token_id=_opt_int(tok.get("pad_token_id"), "pad_token_id"),
            eos_token_ids=tuple(_int(i, "tokenizer.eos_token_ids[]") for i in ids),
            add_bos_token=add_bos,
            chat_template=template,
            special_tokens=dict(special),
        )


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

    def cpu_graph(self, entry: GraphEntry) -> str | None:
        """How graph `entry` is bound to onnxruntime's CPU provider (its com.microsoft ops), or None
        for a standard-ONNX graph, which TensorRT and onnxruntime's CUDA provider take."""
        if entry.precision in QUANTIZED:
            return f"quantized to {entry.precision}"
        parity = self.parity.get(entry.name)
        built = parity.get("graph") if isinstance(parity, dict) else None
        return "fused" if isinstance(built, dict) and built.get("fused") else None

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
            tokenizer = TokenizerEntry.from_dict(tok)
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


def _weights(graph: str, v: object) -> dict[str, WeightRef] | None:
    if v is None:
        return None
    refs = {k: WeightRef.from_dict(ref) for k, ref in v.items()} if isinstance(v, dict) else {}
    bad = [k for k, ref in refs.items() if ref is None]
    if not isinstance(v, dict) or bad:
        raise BundleError(
            f"manifest graph {graph!r} field 'weights' must map parameter names to "
            f"{{'initializer': name, 'transposed': true/false}} (bad: {', '.join(map(str, bad[:3])) or type(v).__name__}); "
            "re-export the bundle"
        )
    return refs


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


__all__ = ["FORMAT", "MANIFEST", "QUANTIZED", "SCHEMA", "GraphEntry", "Manifest", "TokenizerEntry", "WeightRef"]
