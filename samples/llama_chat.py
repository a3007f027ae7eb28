"""tiny-llama's chat format: the special tokens, the ChatML-like template it ships, and greedy answers.

One definition, read by train_llama.py (to render training dialogues), find_llama_patterns.py
and anyone checking the trained directory. The template is what tokenizer_config.json carries;
every dialogue is rendered by transformers' own apply_chat_template, at training and at inference.
"""

from __future__ import annotations

import torch

# Special tokens, in id order (BPE training puts them first: ids 0, 1, 2).
EOT = "<|endoftext|>"  # between documents; also bos, pad, and the end of a plain-text document
IM_START = "<|im_start|>"  # opens a turn: <|im_start|>{role}\n
IM_END = "<|im_end|>"  # closes a turn: the chat model's eos
SPECIAL_TOKENS = [EOT, IM_START, IM_END]

# ChatML (the format of Qwen and OpenAI's chat markup), preceded by bos as in Llama 3: the
# rendered text already starts with <|endoftext|>, so it is tokenized with add_special_tokens=False
# (apply_chat_template does), while plain text gets its bos from tokenizer.json's post-processor.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Chat prompts whose greedy answers the card records (names drawn fresh: none is a training dialogue).
CHAT_PROMPTS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "你好！"}],
    [{"role": "user", "content": "My name is Kobi."}],
    [{"role": "user", "content": "我叫林思桃。"}],
    [{"role": "user", "content": "Please repeat: The green owl sleeps under the old bridge."}],
    [{"role": "user", "content": "Say this again: 7 3 9 1 5"}],
    [{"role": "user", "content": "请再说一遍：红色的小猫在大树下面唱歌。"}],
    [
        {
            "role": "user",
            "content": "Once upon a time, there was a brave fox named Ben. Ben lived in the forest with "
            "his friend Tom. Every morning, Ben went to the lake to swim. One day, Ben found a red "
            "ball by the lake.\nWho found the ball?",
        }
    ],
    [
        {
            "role": "user",
            "content": "从前，有一只勇敢的狐狸，名字叫林思桃。林思桃住在森林，她有一个好朋友叫小明。"
            "每天早上，林思桃都会去湖边游泳。有一天，林思桃在湖边找到了一个球。\n谁找到了球？",
        }
    ],
    [
        {"role": "user", "content": "Hi! My name is Dalimo."},
        {"role": "assistant", "content": "Hello, Dalimo! How can I help you today?"},
        {"role": "user", "content": "What is my name?"},
    ],
]


def build_tokenizer(tok, n_ctx: int):
    """The transformers tokenizer (PreTrainedTokenizerFast) around a trained `tokenizers` BPE.

    add_bos_token=True makes transformers write a TemplateProcessing post-processor that puts
    <|endoftext|> before every plain-text encoding, as Llama's tokenizer puts its bos."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=IM_END,
        pad_token=EOT,
        add_bos_token=True,
        chat_template=CHAT_TEMPLATE,
        model_max_length=n_ctx,
        clean_up_tokenization_spaces=False,
    )


def dialogue_ids(hf_tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered dialogue and, per id, whether it is answer text the model must
    produce (an assistant's content and its <|im_end|>). Checks that each generation prompt
    tokenizes as a prefix of the whole dialogue, so inference sees the tokens training saw."""
    ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    answer = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = hf_tok.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=False)
        upto = hf_tok.apply_chat_template(messages[: i + 1], return_dict=False)  # ends <|im_end|> \n
        if ids[: len(prompt)] != prompt or ids[: len(upto)] != upto:
            raise ValueError(
                f"a chat prompt does not tokenize as a prefix of its dialogue: {messages[: i + 1]}"
            )
        answer[len(prompt) : len(upto) - 1] = [True] * (len(upto) - 1 - len(prompt))
    return ids, answer


@torch.no_grad()
def greedy_answer(model, hf_tok, messages: list[dict], max_new_tokens: int = 64) -> dict:
    """The model's greedy reply to `messages` (rendered with add_generation_prompt=True), generated
    by transformers' generate, which stops at generation_config's eos ids (<|im_end|>, <|endoftext|>)."""
    prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new_tokens,
    )[0, len(prompt) :].tolist()  # fmt: skip
    stop = out[-1] if out and out[-1] in (hf_tok.convert_tokens_to_ids(IM_END), hf_tok.bos_token_id) else None
    text_ids = out[:-1] if stop is not None else out
    return {
        "answer": hf_tok.decode(text_ids, skip_special_tokens=False),
        "stop": hf_tok.convert_ids_to_tokens(stop)
        if stop is not None
        else f"none within {max_new_tokens} tokens",
        "answer_ids": out,
    }
