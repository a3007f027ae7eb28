"""The tokenizer settings beside a tokenizer, read as transformers reads them: tokenizer_config.json,
special_tokens_map.json and chat_template.jinja (named tokens, add_bos_token / add_eos_token, the
chat template)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy.errors import SourceError
from gptdeploy.exporters.sources import files

log = logging.getLogger(__name__)

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"  # transformers >= 4.43 saves the template here
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named tokens a chat template sees as variables.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer_config.json, special_tokens_map.json and chat_template.jinja say; each optional."""

    tokens: dict[str, str] = field(default_factory=dict)  # NAMED_TOKENS present, as text
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    chat_template: str | None = None
    files: tuple[Path, ...] = ()  # the files read


def read_settings(d: Path) -> TokenizerSettings:
    """The tokenizer settings in directory `d`, as transformers reads them: chat_template.jinja
    wins over tokenizer_config.json's chat_template, tokenizer_config.json over special_tokens_map.json."""
    read: list[Path] = []
    config, tokens = {}, {}
    if (d / SPECIAL_TOKENS_MAP).is_file():
        read.append(d / SPECIAL_TOKENS_MAP)
        tokens.update(_named_tokens(files.read_json(d / SPECIAL_TOKENS_MAP), d / SPECIAL_TOKENS_MAP))
    if (d / TOKENIZER_CONFIG).is_file():
        read.append(d / TOKENIZER_CONFIG)
        config = files.read_json(d / TOKENIZER_CONFIG)
        tokens.update(_named_tokens(config, d / TOKENIZER_CONFIG))
    template = _template(config.get("chat_template"), d / TOKENIZER_CONFIG)
    if (d / CHAT_TEMPLATE_JINJA).is_file():
        read.append(d / CHAT_TEMPLATE_JINJA)
        try:
            template = (d / CHAT_TEMPLATE_JINJA).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"{d / CHAT_TEMPLATE_JINJA} cannot be read ({exc}); restore the file") from None
    return TokenizerSettings(
        tokens=tokens,
        add_bos_token=_flag(config, "add_bos_token", d / TOKENIZER_CONFIG),
        add_eos_token=_flag(config, "add_eos_token", d / TOKENIZER_CONFIG),
        chat_template=template or None,
        files=tuple(read),
    )


def _named_tokens(config: dict, where: Path) -> dict[str, str]:
    """bos_token etc. given as a string or as an AddedToken dict ({"content": ..., ...})."""
    out = {}
    for key in NAMED_TOKENS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            out[key] = value
        elif value is not None:
            log.warning("%s: ignoring %s=%r: not a token string or AddedToken", where, key, value)
    return out


def _flag(config: dict, key: str, where: Path) -> bool | None:
    value = config.get(key)
    if value is None or isinstance(value, bool):
        return value
    log.warning("%s: ignoring %s=%r: not true or false", where, key, value)
    return None


def _template(value: object, where: Path) -> str | None:
    """chat_template: a string, or a list of {name, template} of which transformers uses "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"]
        log.warning("%s: chat templates %s, none named 'default'; the bundle gets none "
                    "(give one at run time with --chat-template FILE)", where, ", ".join(sorted(named)))
        return None
    raise SourceError(f"{where}: chat_template must be a string or a list of {{name, template}}, "
                      f"got {type(value).__name__}; fix or remove it")


__all__ = ["NAMED_TOKENS", "TokenizerSettings", "read_settings"]
