"""Chat: a model's chat template rendered as transformers renders it, the prompt ids a Generator
continues (gptdeploy/conversation.py keeps a history within the context).

    template = ChatTemplate.from_bundle(gen.bundle)
    ids = chat_prompt_ids(gen, [{"role": "user", "content": "你好"}], template)
    result = gen.generate_ids([ids], max_new_tokens=64)[0]

The template is the model's own Jinja (tokenizer_config.json's chat_template or chat_template.jinja,
shipped in the bundle). It runs in jinja2's ImmutableSandboxedEnvironment with the settings,
globals and filters of transformers' apply_chat_template (transformers/utils/chat_template_utils.py,
_compile_jinja_template, read at 5.24), so the rendered text is the same. jinja2 only: no torch,
no transformers. A template is untrusted code from a model repository: the sandbox refuses
attribute access to Python internals, and nothing else is exposed to it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptdeploy.errors import BundleError, GenerationError

if TYPE_CHECKING:
    from gptdeploy.bundle import Bundle
    from gptdeploy.generate import Generator
    from gptdeploy.results import GenerationResult
    from gptdeploy.tokenizer import Tokenizer

ROLES_HINT = "each message is {'role': str, 'content': str}"


class ChatTemplateError(GenerationError):
    """A chat template is missing, unreadable, or fails to render the messages."""


class NoChatTemplate(ChatTemplateError):
    """The bundle's model shipped no chat template and none was given."""


# -- the environment: transformers' _compile_jinja_template, minus the assistant-mask tracking --


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; rendering it yields its body, which is all a prompt needs."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' (and so every template) does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type's other attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace() refusing underscore names, which could reach CPython internals."""

    def __init__(*args, **kwargs):  # jinja2's signature trick, so that namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the namespace attribute {name!r}")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    return env


# -- templates and messages -----------------------------------------------------------------------


class ChatTemplate:
    """One Jinja chat template and the special-token texts it reads (bos_token, eos_token, ...)."""

    def __init__(self, source: str, name: str, special_tokens: Mapping[str, str] | None = None):
        self.source = source
        self.name = name  # how errors name it: a bundle file or the --chat-template path
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"chat template {name} has a syntax error on line {exc.lineno}: {_one_line(exc.message)}"
            ) from None

    @classmethod
    def from_bundle(cls, bundle: Bundle, override: Path | None = None) -> ChatTemplate:
        """The bundle's template, or the file `override` (read with the bundle's special tokens)."""
        entry = bundle.manifest.tokenizer
        if override is not None:
            return cls.from_file(override, entry.special_tokens)
        if entry.chat_template is None:
            raise NoChatTemplate(
                f"bundle {bundle.path} has no chat template (its model shipped none); "
                "give one with --chat-template FILE (a Jinja chat template such as a model's chat_template.jinja)"
            )
        if entry.chat_template not in bundle.manifest.files:
            raise BundleError(f"manifest does not list a SHA-256 for the chat template {entry.chat_template!r}")
        name = f"{entry.chat_template!r} of bundle {bundle.path}"
        return cls(_read(bundle.file(entry.chat_template), f"chat template {name}"), name, entry.special_tokens)

    @classmethod
    def from_file(cls, path: Path, special_tokens: Mapping[str, str] | None = None) -> ChatTemplate:
        path = Path(path)
        if not path.exists():
            raise ChatTemplateError(f"chat template file {path} does not exist; give --chat-template an existing Jinja file")
        return cls(_read(path, f"chat template file {path}"), str(path), special_tokens)

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, as transformers' apply_chat_template(tokenize=False)."""
        variables = {
            **self.special_tokens,
            "messages": check_messages(messages),
            "tools": None,
            "documents": None,
            "add_generation_prompt": bool(add_generation_prompt),
        }
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as exc:  # raise_exception, undefined, sandbox refusals
            why = _one_line(str(exc)) or type(exc).__name__
        except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError) as exc:
            # Python errors of the template's own expressions (e.g. "a" + 1)
            why = f"{type(exc).__name__}: {_one_line(str(exc))}"
        raise ChatTemplateError(f"chat template {self.name} cannot render these messages: {why}")


def check_messages(messages: object) -> list[dict[str, str]]:
    """Fresh copies of `messages`, checked: a non-empty list of {"role": str, "content": str}."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise GenerationError(f"messages must be a non-empty list; {ROLES_HINT}")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise GenerationError(f"message {n} is a {type(m).__name__}; {ROLES_HINT}")
        extra = sorted(set(m) - {"role", "content"})
        if extra or not isinstance(m.get("role"), str) or not m["role"] or not isinstance(m.get("content"), str):
            raise GenerationError(f"message {n} is {_short(m)}; {ROLES_HINT} and no other keys")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """One user turn, after an optional system message."""
    if not prompt:
        raise GenerationError("the prompt is empty; give at least one character")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat. The template writes its own special tokens, so the text is
    encoded without them, as transformers' apply_chat_template(tokenize=True) does; a model that
    starts every sequence with BOS still gets exactly one (templates write {{ bos_token }}
    themselves: Llama, Mistral, Gemma; for one that does not, gptdeploy adds it)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if tokenizer.adds_bos and ids[:1] != [bos]:
        ids.insert(0, bos)
    if not ids:
        raise GenerationError("the chat template rendered these messages to no tokens")
    return ids


def chat_prompt_ids(generator: Generator, messages, template: ChatTemplate | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids for `messages` under `template` (default: the bundle's)."""
    template = template or ChatTemplate.from_bundle(generator.bundle)
    return prompt_ids(generator.tokenizer, template.render(messages, add_generation_prompt))


def generate_chat(generator: Generator, messages, template: ChatTemplate | None = None, **options) -> GenerationResult:
    """The assistant's reply to `messages`; options are GenerationOptions' fields."""
    return generator.generate_ids([chat_prompt_ids(generator, messages, template)], **options)[0]


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ChatTemplateError(f"{what} is a directory; give a Jinja template file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"cannot read {what}: {_one_line(str(exc))}") from None


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _short(m: Mapping) -> str:
    text = repr(dict(m))
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = ["ChatTemplate", "ChatTemplateError", "NoChatTemplate", "chat_messages", "chat_prompt_ids", "check_messages",
           "generate_chat", "prompt_ids"]
