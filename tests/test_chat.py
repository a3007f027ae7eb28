"""Chat templates rendered as transformers renders them (text and token ids), the bundle's
template from export to `generate --chat` and the `chat` REPL, history kept within the context,
and a run path that stays torch- and transformers-free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gptdeploy.chat import (
    ChatTemplate,
    ChatTemplateError,
    NoChatTemplate,
    chat_prompt_ids,
    check_messages,
    generate_chat,
    prompt_ids,
)
from gptdeploy.cli import cli
from gptdeploy.conversation import Conversation
from gptdeploy.errors import ContextOverflowError, GenerationError
from gptdeploy.generate import Generator
from gptdeploy.manifest import TokenizerEntry
from gptdeploy.tokenizer import Tokenizer
from tests.factories import EOT, tokenizer_json
from tests.runtime_bundles import made

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# -- real-world-style templates, written as the models ship them ---------------------------------

QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- for tool in tools %}{{- tool | tojson }}{%- endfor %}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral's: alternating roles enforced with raise_exception.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Llama 2's: a default system message when the conversation has none.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = 'You are a helpful, respectful and honest assistant.' %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# The environment's extras: namespace, loop controls, tojson (indent, non-ASCII), dict, {% generation %}.
FEATURES = """{% set ns = namespace(n=0, last='') %}
{% for m in messages %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}{% set ns.last = m.content %}
  {% if m.role == 'assistant' %}{% generation %}A: {{ m.content }}{% endgeneration %}
  {% else %}{{ m.role | upper }}: {{ m.content }}
  {% endif %}
  {% if ns.n >= 3 %}{% break %}{% endif %}
{% endfor %}
{{ dict(n=ns.n, last=ns.last) | tojson(indent=2) }}
{{ messages | map(attribute='content') | list | tojson }}
{% if add_generation_prompt %}A:{% endif %}"""

TEMPLATES = {"qwen": QWEN, "llama3": LLAMA3, "mistral": MISTRAL, "llama2": LLAMA2, "features": FEATURES}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be brief. 简短。"}, {"role": "user", "content": "Hi there "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}, {"role": "user", "content": '"c" <&>'}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "1"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "3"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "5"}],
]


@pytest.fixture(scope="module")
def hf_tok():
    from tokenizers import Tokenizer as Raw
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Raw.from_str(tokenizer_json()), **SPECIAL)


def _hf_render(hf_tok, template, messages, agp):
    return hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=agp)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("agp", [True, False])
def test_rendering_equals_transformers_apply_chat_template(hf_tok, name, agp):
    ours = ChatTemplate(TEMPLATES[name], name, SPECIAL)
    for messages in CONVERSATIONS:
        try:
            want = _hf_render(hf_tok, TEMPLATES[name], messages, agp)
        except Exception as exc:  # noqa: BLE001 - transformers raises jinja2's TemplateError as is
            with pytest.raises(ChatTemplateError, match="cannot render these messages") as err:
                ours.render(messages, agp)
            assert str(exc) in str(err.value)
            continue
        assert ours.render(messages, agp) == want, (name, messages)


def test_raise_exception_is_one_line_naming_the_template_and_jinjas_message():
    t = ChatTemplate(MISTRAL, "mistral.jinja", SPECIAL)
    with pytest.raises(ChatTemplateError) as err:
        t.render([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    assert str(err.value) == ("chat template mistral.jinja cannot render these messages: "
                              "Conversation roles must alternate user/assistant/user/assistant/...")


@pytest.mark.parametrize(("source", "match"), [
    ("{% for m in messages %}{{ m.content }", "has a syntax error on line 1"),
    ("{% endfor %}", "has a syntax error"),
    ("{{ nothing.here() }}", "cannot render these messages: 'nothing' is undefined"),
    ("{{ messages[0].content + 1 }}", "cannot render these messages: TypeError"),
    ("{% set ns = namespace(_x=1) %}", "cannot set the namespace attribute '_x'"),
    ("{{ messages.__class__.__subclasses__() }}", "cannot render these messages"),  # the sandbox
])
def test_a_template_that_fails_is_one_chat_template_error(source, match):
    with pytest.raises(ChatTemplateError, match=match) as err:
        ChatTemplate(source, "t.jinja").render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value) and "t.jinja" in str(err.value)


@pytest.mark.parametrize("messages", [
    [], "hi", [{"role": "user"}], [{"role": "user", "content": 3}], [{"role": "", "content": "x"}],
    [{"role": "user", "content": "x", "name": "bob"}], ["hi"],
])
def test_messages_are_checked(messages):
    with pytest.raises(GenerationError, match="role"):
        check_messages(messages)


# -- token ids: as transformers' apply_chat_template(tokenize=True), BOS exactly once -----------------

LLAMA_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _tokenizer_pair(bos_first: bool):
    """Our runtime Tokenizer and transformers' over one tokenizer.json with Llama 3's special tokens;
    `bos_first`: its post-processor adds <|begin_of_text|>, as Llama 3's does."""
    from tokenizers import AddedToken, processors
    from tokenizers import Tokenizer as Raw
    from transformers import PreTrainedTokenizerFast

    raw = Raw.from_str(tokenizer_json())
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIAL])
    bos = raw.token_to_id("<|begin_of_text|>")
    if bos_first:
        raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    ours = Tokenizer(Raw.from_str(raw.to_str()), TokenizerEntry("tokenizer.json", raw.get_vocab_size(), bos + 3, bos,
                                                                special_tokens=tokens))
    return ours, PreTrainedTokenizerFast(tokenizer_object=raw, **tokens), tokens


@pytest.mark.parametrize("bos_first", [True, False])
def test_prompt_ids_equal_transformers_and_bos_is_not_doubled(bos_first):
    ours, hf, tokens = _tokenizer_pair(bos_first)
    t = ChatTemplate(LLAMA3, "llama3", tokens)
    for messages in CONVERSATIONS:
        ids = prompt_ids(ours, t.render(messages))
        want = hf.apply_chat_template(messages, chat_template=LLAMA3, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        assert ids == want and ids.count(ours.bos_token_id) == 1


def test_a_template_without_bos_on_a_bos_model_gets_one_bos():
    """transformers leaves BOS out here (it encodes without special tokens); the model was trained
    with BOS in front of every sequence, so gptdeploy puts the one BOS there."""
    ours, hf, tokens = _tokenizer_pair(bos_first=True)
    messages = CONVERSATIONS[0]
    ids = prompt_ids(ours, ChatTemplate(QWEN, "qwen", tokens).render(messages))
    want = hf.apply_chat_template(messages, chat_template=QWEN, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert ids == [ours.bos_token_id, *want]


# -- the bundle: export copies the template; generate --chat and chat use it --------------------------

CHAT_SPECIAL = ["<|im_start|>", "<|im_end|>"]  # ids 297, 298 of the chat source's tokenizer


@pytest.fixture(scope="module")
def chat_source(tmp_path_factory) -> Path:
    """An HF GPT-2 directory whose tokenizer has ChatML's tokens and whose tokenizer_config.json
    holds Qwen's template and eos <|im_end|>; generation_config.json lists two EOS ids."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Raw

    from tests.factories import make_hf_gpt2_dir

    hf = make_hf_gpt2_dir(tmp_path_factory.mktemp("chat") / "hf", n_layer=1, n_head=2, n_embd=16,
                          n_positions=128, vocab_size=320, seed=5)
    raw = Raw.from_str(tokenizer_json())
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL])
    (hf / "tokenizer.json").write_text(raw.to_str(), encoding="utf-8")
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": EOT, "chat_template": QWEN,
        "tokenizer_class": "PreTrainedTokenizerFast"}), encoding="utf-8")
    gen_config = json.loads((hf / "generation_config.json").read_text())
    (hf / "generation_config.json").write_text(json.dumps(gen_config | {"eos_token_id": [298, 296]}))
    return hf


@pytest.fixture(scope="module")
def chat_bundle(chat_source, tmp_path_factory) -> Path:
    from gptdeploy.exporters.export import export_bundle

    return export_bundle(chat_source, tmp_path_factory.mktemp("chat-b") / "b").bundle.path


def test_export_writes_the_template_and_every_eos_id_into_the_bundle(chat_source, chat_bundle):
    from gptdeploy.bundle import Bundle
    from gptdeploy.hashing import sha256_file

    m = Bundle.load(chat_bundle).manifest
    t = m.tokenizer
    assert t.chat_template == "chat_template.jinja" and (chat_bundle / t.chat_template).read_text() == QWEN
    assert m.files[t.chat_template] == sha256_file(chat_bundle / t.chat_template)
    # config.json's eos (296) is the primary; generation_config's list and tokenizer_config's eos follow.
    assert (t.eos_token_id, t.eos_token_ids) == (296, (296, 298))
    assert t.special_tokens == {"eos_token": "<|im_end|>", "pad_token": EOT} and not t.add_bos_token


def test_generate_chat_equals_transformers_prompt_and_greedy_tokens(chat_source, chat_bundle):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    r = CliRunner().invoke(cli, ["generate", str(chat_bundle), "你好", "--chat", "--system", "Be brief.",
                                 "--max-new-tokens", "12", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    want = AutoTokenizer.from_pretrained(chat_source).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got["prompt_token_ids"] == want
    model = GPT2LMHeadModel.from_pretrained(chat_source, attn_implementation="eager").eval()
    ids = torch.tensor([want])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             eos_token_id=[296, 298], pad_token_id=296)
    assert got["token_ids"] == out[0, len(want):].tolist()
    with Generator.load(chat_bundle, threads=1) as gen:
        assert generate_chat(gen, messages, max_new_tokens=12).token_ids == got["token_ids"]
        assert chat_prompt_ids(gen, messages) == want


def test_generate_chat_streams_and_takes_a_template_file(chat_bundle, tmp_path):
    r = CliRunner().invoke(cli, ["generate", str(chat_bundle), "hi", "--chat", "--stream", "--max-new-tokens", "6"])
    plain = CliRunner().invoke(cli, ["generate", str(chat_bundle), "hi", "--chat", "--max-new-tokens", "6"])
    assert r.exit_code == plain.exit_code == 0 and r.stdout == plain.stdout
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    with Generator.load(chat_bundle, threads=1) as gen:
        override = ChatTemplate.from_bundle(gen.bundle, tmp_path / "t.jinja")
        assert override.render([{"role": "user", "content": "hi"}]) == "hi"
        assert override.special_tokens == gen.bundle.manifest.tokenizer.special_tokens


def test_chat_needs_a_template_and_says_how_to_give_one(tmp_path):
    with Generator.load(made("small").bundle, threads=1) as gen:
        with pytest.raises(NoChatTemplate, match="--chat-template FILE"):
            chat_prompt_ids(gen, [{"role": "user", "content": "hi"}])
        with pytest.raises(ChatTemplateError, match="does not exist"):
            ChatTemplate.from_bundle(gen.bundle, tmp_path / "nope.jinja")
        (tmp_path / "d.jinja").mkdir()
        with pytest.raises(ChatTemplateError, match="is a directory"):
            ChatTemplate.from_bundle(gen.bundle, tmp_path / "d.jinja")
    r = CliRunner().invoke(cli, ["generate", str(made("small").bundle), "hi", "--system", "x"])
    assert r.exit_code == 2 and "--system and --chat-template are used with --chat" in r.stderr


# -- conversations and the REPL -----------------------------------------------------------------------


def test_the_history_drops_the_oldest_turns_never_the_system_message(chat_bundle):
    with Generator.load(chat_bundle, threads=1) as gen:
        convo = Conversation(gen, ChatTemplate.from_bundle(gen.bundle), system="Be brief.")
        dropped = []
        for text in ("first message here", "second one", "third one", "fourth"):
            with convo.reply(text, max_new_tokens=16) as reply:
                "".join(reply)
            dropped.append(reply.dropped)
            assert reply.result is not None and convo.turns[-1] == (text, reply.result.text)
            ids = chat_prompt_ids(gen, convo.messages())
            assert len(ids) <= gen.max_context
        assert sum(dropped) > 0  # 128 positions cannot hold four turns of 16 new tokens (~30 positions each)
        assert convo.messages()[0] == {"role": "system", "content": "Be brief."}
        users = [u for u, _ in convo.turns]
        assert users[-1] == "fourth" and "first message here" not in users  # the oldest went first
        kept = list(convo.turns)
        with pytest.raises(ContextOverflowError, match="Shorten the message"):
            convo.reply("long " * 200, max_new_tokens=16)
        assert convo.turns == kept  # a refused message drops nothing
        convo.reset()
        assert convo.messages() == [{"role": "system", "content": "Be brief."}]


def test_the_chat_repl_streams_resets_and_exits_0(chat_bundle):
    lines = ("first message here\n\nsecond one\nthird one\n" + "long " * 200 + "\nfourth\n/reset\nfifth\n/exit\n"
             "not read\n")
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--system", "Be brief.", "--max-new-tokens", "16"],
                           input=lines)
    assert r.exit_code == 0, r.output
    assert not r.stdout.startswith("> ")  # no prompt when stdin is not a terminal
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Shorten the message" in errors[0]
    assert "[history cleared]" in r.stderr and "oldest turn(s) to fit the model's 128-position context" in r.stderr
    with Generator.load(chat_bundle, threads=1) as gen:  # the same answers through the library
        convo = Conversation(gen, ChatTemplate.from_bundle(gen.bundle), system="Be brief.")
        want = []
        for text in ("first message here", "second one", "third one", "fourth", None, "fifth"):
            if text is None:
                convo.reset()
                continue
            with convo.reply(text, max_new_tokens=16) as reply:
                want.append("".join(reply))
    # One reply per message sent (the blank line, /reset and the refused one send none), each ending in a newline.
    assert r.stdout == "".join(w + "\n" for w in want)


def test_the_chat_repl_refuses_a_message_the_model_cannot_take_and_goes_on(chat_bundle, tmp_path):
    """Any GenerationError for one message (here the template's own raise_exception) is an error
    line; the next message is answered."""
    template = tmp_path / "picky.jinja"
    template.write_text("{% for m in messages %}{% if 'forbidden' in m['content'] %}"
                        "{{ raise_exception('no forbidden words') }}{% endif %}"
                        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "<|im_start|>assistant\n", encoding="utf-8")
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--chat-template", str(template), "--max-new-tokens", "4"],
                           input="a forbidden word\nhello\n")
    assert r.exit_code == 0, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "no forbidden words" in errors[0]
    assert r.stdout.count("\n") == 1  # the second message was answered


def test_the_chat_repl_ends_at_end_of_input_and_refuses_a_bundle_without_template():
    ok = CliRunner().invoke(cli, ["chat", str(made("small").bundle), "--chat-template", "/nonexistent.jinja"],
                            input="")
    assert ok.exit_code == 2 and "does not exist" in ok.stderr
    r = CliRunner().invoke(cli, ["chat", str(made("small").bundle)], input="hi\n")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "--chat-template FILE" in r.stderr


TORCH_FREE = """
import json, sys
for name in ("torch", "transformers", "onnx"):
    sys.modules[name] = None  # any import of them fails
from click.testing import CliRunner
from gptdeploy.cli import cli
from gptdeploy.conversation import Conversation
r = CliRunner().invoke(cli, ["chat", sys.argv[1], "--max-new-tokens", "4"], input="你好\\nagain\\n")
g = CliRunner().invoke(cli, ["generate", sys.argv[1], "hi", "--chat", "--max-new-tokens", "4"])
leaked = sorted(m for m in ("torch", "transformers", "onnx") if sys.modules.get(m) is not None)
print(json.dumps({"chat": r.exit_code, "generate": g.exit_code, "out": r.output + g.output, "leaked": leaked,
                  "jinja2": "jinja2" in sys.modules}))
"""


def test_chat_runs_without_torch_and_transformers(chat_bundle):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(chat_bundle)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (data["chat"], data["generate"], data["leaked"], data["jinja2"]) == (0, 0, [], True), data["out"]
