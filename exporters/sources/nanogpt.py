"""nanoGPT checkpoints: train.py's ckpt.pt (model, model_args, config) plus meta.pkl or --tokenizer."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from gptdeploy.config import GPTConfig
from gptdeploy.errors import ConfigError, SourceError
from gptdeploy.exporters.sources import files, tokenizer_files

if TYPE_CHECKING:
    from gptdeploy.exporters.sources.base import Source, Tokenizer

KIND = "nanogpt"
DESCRIPTION = "nanoGPT checkpoint (ckpt.pt from train.py, or a directory holding one)"

CKPT = "ckpt.pt"
META = "meta.pkl"
_COMPILED = "_orig_mod."  # torch.compile wraps the module; nanoGPT's sample.py strips this prefix too
_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.bias")  # causal mask, saved when flash is off
_DATASET = re.compile(r"[\w.-]+")
_META_SEARCH_DEPTH = 3  # ckpt dir, its parent, grandparent: out-x/ckpt.pt beside data/x/meta.pkl


def detect(path: Path) -> bool:
    return (path.is_file() and path.suffix in (".pt", ".pth")) or (path.is_dir() and (path / CKPT).is_file())


def load(path: Path, tokenizer: Path | None = None) -> Source:
    from gptdeploy.exporters.sources import weights
    from gptdeploy.exporters.sources.base import Source

    ckpt_path = path / CKPT if path.is_dir() else path
    ckpt = weights.read_torch(ckpt_path)
    if not (
        isinstance(ckpt, dict)
        and weights.is_state_dict(ckpt.get("model"))
        and isinstance(ckpt.get("model_args"), dict)
    ):
        raise SourceError(
            f"{ckpt_path} is not a nanoGPT train.py checkpoint: expected a dict with "
            "'model' (state dict) and 'model_args'"
        )
    raw = {k.removeprefix(_COMPILED): v for k, v in ckpt["model"].items()}
    nano = {k: v.float() for k, v in raw.items() if not _MASK_BUFFER.fullmatch(k)}  # nanoGPT's names
    config = config_from_args(ckpt["model_args"], nano, ckpt_path)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in nano.items() if k != "lm_head.weight"}
    try:
        weights.check_state(config, state)
    except SourceError as exc:
        raise SourceError(f"{ckpt_path}: {exc}; check model_args against the weights") from None
    weights.untie_check(state["wte.weight"], nano.get("lm_head.weight"), ckpt_path)

    tok, tok_files = _tokenizer(ckpt_path, ckpt.get("config"), tokenizer, config.vocab_size)
    root = ckpt_path.parent
    name = root.resolve().name if ckpt_path.name == CKPT else ckpt_path.stem
    description = files.describe(root, name, DESCRIPTION, [ckpt_path, *tok_files], [ckpt_path])
    description["training"] = _training_facts(ckpt)
    reference = functools.partial(_reference, nano, config.n_head)
    return Source(
        kind=KIND,
        path=path,
        config=config,
        state=state,
        tokenizer=tok,
        reference=reference,
        description=description,
    )


def config_from_args(args: dict, nano: dict, where: Path) -> GPTConfig:
    """nanoGPT's model_args -> GPTConfig: exact GELU (nn.GELU()), LayerNorm eps 1e-5, as model.py."""
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size") if k not in args]
    if missing:
        raise SourceError(f"{where}: model_args lacks {', '.join(missing)}; is it a nanoGPT checkpoint?")
    wte = nano.get("transformer.wte.weight")
    vocab = args.get("vocab_size") or (wte.shape[0] if wte is not None else None)
    try:
        return GPTConfig(
            n_layer=args["n_layer"],
            n_head=args["n_head"],
            n_embd=args["n_embd"],
            vocab_size=vocab,
            block_size=args["block_size"],
            bias=bool(args.get("bias", "transformer.ln_f.bias" in nano)),
            layer_norm_eps=1e-5,
            gelu="exact",
        )
    except ConfigError as exc:
        raise SourceError(f"{where}: {exc}") from None


def find_meta(ckpt_path: Path, train_config: object) -> Path | None:
    """meta.pkl beside the checkpoint, else data/<dataset>/meta.pkl as nanoGPT's sample.py finds it
    (relative to the directory it runs in: we try the checkpoint's directory and its parents)."""
    if (ckpt_path.parent / META).is_file():
        return ckpt_path.parent / META
    dataset = train_config.get("dataset") if isinstance(train_config, dict) else None
    if not (isinstance(dataset, str) and _DATASET.fullmatch(dataset) and dataset not in (".", "..")):
        return None
    roots = [ckpt_path.parent.resolve(), *ckpt_path.parent.resolve().parents][:_META_SEARCH_DEPTH]
    return next((r / "data" / dataset / META for r in roots if (r / "data" / dataset / META).is_file()), None)


def _tokenizer(ckpt_path: Path, train_config, given: Path | None, vocab: int) -> tuple[Tokenizer, list[Path]]:
    from gptdeploy.exporters.sources.safe_pickle import load_data_pickle

    if given is not None:
        text, used = tokenizer_files.from_argument(given)
        return tokenizer_files.make_tokenizer(text, vocab, [], ckpt_path), used
    meta_path = find_meta(ckpt_path, train_config)
    if meta_path is None:
        raise SourceError(
            f"{ckpt_path} has no {META} beside it (or under data/<dataset>/), so it uses the GPT-2 BPE "
            "vocabulary, which cannot be downloaded here; pass --tokenizer with GPT-2's tokenizer.json "
            "(or a directory holding vocab.json + merges.txt)"
        )
    meta = load_data_pickle(meta_path)
    stoi = meta.get("stoi") if isinstance(meta, dict) else None
    if not isinstance(stoi, dict):
        raise SourceError(f"{meta_path} has no character vocabulary (stoi); pass --tokenizer instead")
    itos = meta.get("itos")
    if isinstance(itos, (dict, list)) and any(_at(itos, i) != c for c, i in stoi.items()):
        raise SourceError(f"{meta_path}: stoi and itos disagree; rebuild it with the dataset's prepare.py")
    text = tokenizer_files.char_vocab_json(stoi, str(meta_path))
    return tokenizer_files.make_tokenizer(text, vocab, [], ckpt_path), [meta_path]


def _at(itos, i):
    if isinstance(itos, dict):
        return itos.get(i)
    return itos[i] if isinstance(i, int) and 0 <= i < len(itos) else None


def _training_facts(ckpt: dict) -> dict:
    facts = {"iter_num": ckpt.get("iter_num"), "best_val_loss": ckpt.get("best_val_loss")}
    if isinstance(ckpt.get("config"), dict):
        facts["dataset"] = ckpt["config"].get("dataset")
    out = {}
    for k, v in facts.items():  # best_val_loss is a 0-d tensor in train.py; keep JSON-ready values only
        v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            out[k] = v
    return out


def _reference(nano: dict, n_head: int):
    from gptdeploy.exporters.references import NanoGPTReference

    return NanoGPTReference(nano, n_head)
