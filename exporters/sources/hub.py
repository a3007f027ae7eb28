"""Hugging Face hub ids as export sources: "org/name" or "org/name@revision", resolved to a
snapshot directory in huggingface_hub's cache. Where the cache is (HF_HOME, HF_HUB_CACHE) and
whether the hub may be asked (HF_HUB_OFFLINE) are huggingface_hub's own settings, read through
its functions. Online, only the files export reads are downloaded; offline (or with the hub out
of reach), a complete cached snapshot is used, and anything missing is named with the command
that fetches it.

    path = resolve("Qwen/Qwen2.5-0.5B")          # .../models--Qwen--Qwen2.5-0.5B/snapshots/<commit>
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from gptdeploy.errors import SourceError

log = logging.getLogger(__name__)

CONFIG = "config.json"
TOKENIZER_JSON = "tokenizer.json"
GPT2_VOCAB = ("vocab.json", "merges.txt")  # a tokenizer for repos without tokenizer.json
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"  # only when there are no safetensors
# Read when present: EOS ids, special tokens, the chat template.
SETTINGS = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# What `hf download` should fetch when nothing is cached (model*.safetensors: not Mistral's
# consolidated.safetensors, a second copy of the weights in another layout).
INCLUDE = ("*.json", "model*.safetensors", "*.jinja")

# huggingface_hub's validate_repo_id rules, with the namespace required: name characters
# [A-Za-z0-9_.-], at most 96, not starting or ending with "-" or ".", no "--" or "..", no ".git" end.
_PART = r"(?![-.])[\w.-]{1,96}(?<![-.])"
_HUB_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[\w.][\w./-]*))?", re.ASCII)


@dataclass(frozen=True)
class HubId:
    repo_id: str  # "org/name"
    revision: str | None = None  # branch, tag or commit; None: the repo's main branch

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse(spec: str) -> HubId:
    """"org/name[@revision]" -> HubId; anything else is a SourceError saying the expected form."""
    m = _HUB_ID.fullmatch(spec) if isinstance(spec, str) else None
    repo = m and m["repo"]
    if not repo or "--" in repo or ".." in repo or repo.endswith(".git"):
        raise SourceError(
            f"{spec!r} is not a Hugging Face hub id: expected ORG/NAME or ORG/NAME@REVISION (letters, digits, "
            "'-', '_', '.'; no '--' or '..'), or a local model directory or checkpoint"
        )
    return HubId(repo, m["revision"])


def looks_like_hub_id(spec: str) -> bool:
    """Whether `spec` reads as "org/name[@revision]" and is not an existing path."""
    try:
        parse(str(spec))
    except SourceError:
        return False
    return not Path(spec).exists()


def resolve(spec: str, *, offline: bool | None = None, cache_dir: Path | None = None) -> Path:
    """The local snapshot directory of hub id `spec`, downloaded if need be and allowed.

    offline: None follows huggingface_hub (HF_HUB_OFFLINE); cache_dir: None is its cache."""
    hub = parse(spec)
    try:
        from huggingface_hub import constants
    except ModuleNotFoundError:
        raise SourceError(f"{spec} is a hub id; reading it needs huggingface_hub: pip install 'gptdeploy[export]'") from None
    offline = bool(constants.HF_HUB_OFFLINE) if offline is None else offline
    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    fetch = _Fetcher(hub, offline, cache)

    snap = fetch([CONFIG, TOKENIZER_JSON, *SETTINGS, SAFETENSORS, SAFETENSORS_INDEX])
    if not (snap / SAFETENSORS).is_file():
        if (snap / SAFETENSORS_INDEX).is_file():
            snap = fetch(_shards(snap / SAFETENSORS_INDEX))
        else:  # a checkpoint saved before safetensors
            snap = fetch([BIN, BIN_INDEX])
            if not (snap / BIN).is_file() and (snap / BIN_INDEX).is_file():
                snap = fetch(_shards(snap / BIN_INDEX))
    if not (snap / TOKENIZER_JSON).is_file():
        snap = fetch(list(GPT2_VOCAB))
    missing = list(dict.fromkeys(needed(snap) + fetch.known_missing))
    if missing:
        raise SourceError(_missing_message(hub, snap, missing, offline, cache, fetch.unreachable))
    log.info("hub id %s -> %s", hub, snap)
    return snap


def needed(snap: Path) -> list[str]:
    """The files export needs that snapshot `snap` lacks: config.json, a tokenizer and the weights
    (one file, or an index and every shard it names)."""
    missing = [] if (snap / CONFIG).is_file() else [CONFIG]
    if not (snap / TOKENIZER_JSON).is_file() and not all((snap / f).is_file() for f in GPT2_VOCAB):
        missing.append(TOKENIZER_JSON)
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (BIN, BIN_INDEX)):
        if (snap / single).is_file():
            return missing
        if (snap / index).is_file():
            return missing + [s for s in _shards(snap / index) if not (snap / s).is_file()]
    return missing + [SAFETENSORS]


def _shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise SourceError(f"{index} is not a weight index ({exc}); re-download it") from None
    bad = [n for n in names if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith(".")]
    if bad:
        raise SourceError(f"{index} names shards outside the snapshot ({bad[:3]}); re-download it")
    return names


class _Fetcher:
    """snapshot_download of some files of one hub id; remembers why the hub could not be asked
    and which files the cached tree listing says the repo has that are not on disk."""

    def __init__(self, hub: HubId, offline: bool, cache: Path):
        self.hub, self.offline, self.cache = hub, offline, cache
        self.unreachable: str | None = None
        self.known_missing: list[str] = []

    def __call__(self, names: list[str]) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        hub = self.hub
        try:
            return Path(snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=list(names),
                                          cache_dir=self.cache, local_files_only=self.offline))
        except LocalEntryNotFoundError as exc:
            path = getattr(exc, "snapshot_path", None)  # IncompleteSnapshotError (huggingface_hub 2.x)
            if path is not None:  # its cached tree listing shows files missing: name them below
                self._note_unreachable(exc)
                listed = self._listed(Path(path).name)
                self.known_missing += [n for n in names if n in listed and not (Path(path) / n).is_file()]
                return Path(path)
            self._note_unreachable(exc)
            raise SourceError(_not_cached_message(hub, self.cache, self.offline, self.unreachable)) from None
        except GatedRepoError:
            raise SourceError(f"{hub.repo_id} is gated on the Hugging Face hub: accept its license on "
                              f"https://huggingface.co/{hub.repo_id} and log in with `hf auth login`") from None
        except RepositoryNotFoundError:
            raise SourceError(f"{hub} is neither a local path nor a model on the Hugging Face hub (or it is "
                              "private: log in with `hf auth login`)") from None
        except RevisionNotFoundError:
            raise SourceError(f"{hub.repo_id} has no revision {hub.revision!r} on the Hugging Face hub") from None
        except (HfHubHTTPError, OSError) as exc:
            raise SourceError(f"cannot download {hub} from the Hugging Face hub: {_one_line(exc)}") from None

    def _listed(self, commit: str) -> set[str]:
        """The files the cached tree listing of `commit` names (huggingface_hub 2.x keeps one)."""
        import huggingface_hub

        try:
            tree = huggingface_hub.get_cached_repo_tree(self.hub.repo_id, revision=commit, cache_dir=self.cache)
        except (AttributeError, huggingface_hub.errors.CachedRepoTreeNotFoundError, OSError, ValueError):
            return set()
        return {f.path for f in tree}

    def _note_unreachable(self, exc: BaseException) -> None:
        cause = exc.__cause__
        if not self.offline and cause is not None and self.unreachable is None:
            self.unreachable = f"{type(cause).__name__}: {_one_line(cause)}"[:160]


def _not_cached_message(hub: HubId, cache: Path, offline: bool, unreachable: str | None) -> str:
    why = ("downloads are off (offline mode, HF_HUB_OFFLINE)" if offline
           else f"the hub cannot be reached ({unreachable or 'no connection'})")
    rev = f" --revision {hub.revision}" if hub.revision else ""
    include = " ".join(f'--include "{p}"' for p in INCLUDE)
    return (f"{hub} is not in the Hugging Face cache {cache}{_cached_revisions(hub, cache)} and {why}; "
            f"on a machine with access run `hf download {hub.repo_id}{rev} {include}` and copy its "
            f"{_folder(hub)} folder into {cache}")


def _missing_message(hub: HubId, snap: Path, missing: list[str], offline: bool, cache: Path,
                     unreachable: str | None) -> str:
    rev = f" --revision {hub.revision}" if hub.revision else ""
    if not offline and unreachable is None:  # the hub answered: the repo itself lacks them
        return f"{hub} on the Hugging Face hub has no {', '.join(missing)}; is it a transformers model repository?"
    why = "downloads are off (offline mode, HF_HUB_OFFLINE)" if offline else f"the hub cannot be reached ({unreachable})"
    return (f"the cached snapshot {snap} of {hub} lacks {', '.join(missing)} and {why}; on a machine with access "
            f"run `hf download {hub.repo_id}{rev} {' '.join(missing)}` and copy its {_folder(hub)} folder into {cache}")


def _cached_revisions(hub: HubId, cache: Path) -> str:
    """' (cached revisions: main, v1)' when other revisions of the repo are cached."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(cache).repos
    except (CacheNotFound, OSError):
        return ""
    names = sorted(
        ref or rev.commit_hash[:12]
        for repo in repos if repo.repo_id == hub.repo_id and repo.repo_type == "model"
        for rev in repo.revisions for ref in (sorted(rev.refs) or [None])
    )
    return f" (cached revisions: {', '.join(names)})" if names else ""


def _folder(hub: HubId) -> str:
    return "models--" + hub.repo_id.replace("/", "--")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = ["HubId", "looks_like_hub_id", "needed", "parse", "resolve"]
