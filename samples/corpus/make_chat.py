"""Generate tiny-llama's bilingual (English + Chinese) chat dialogues from the corpus's own sentence material.

    python samples/corpus/make_chat.py      # writes chat_train.jsonl and chat_val.jsonl next to this file

Output format: JSON Lines, one dialogue per line: {"kind": ..., "messages": [{"role": "user" |
"assistant", "content": ...}, ...]}. The messages are not rendered here: samples/train_llama.py
renders every dialogue through the chat template that tiny-llama's tokenizer_config.json ships
(tokenizer.apply_chat_template), so the training text is exactly what inference renders.

Dialogue kinds, in both languages (words, names and stories come from make_corpus.Writer):
  repeat    "Say this again: <sentence>" -> the sentence, verbatim (a digit code, a shopping list,
            a word list or one or two of the corpus's random sentences): only copying answers it
  story-qa  a corpus story, then a question; the answer starts with a character's name, which is
            random or invented, so it must be copied from the story (the name-copy head)
  greeting  hello / thanks / goodbye / "my name is X" (answered with X) / "what is your name?"
  multi     two or three turns: a self-introduction, a repeat request, then "what is my name?"

val uses seed + 1000 and drops every dialogue that also occurs in train, as make_corpus.py does.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from make_corpus import (
    EN_COLORS,
    EN_FOODS,
    EN_OBJECTS,
    EN_THINGS,
    ZH_COLORS,
    ZH_FOODS,
    ZH_OBJECTS,
    Writer,
    write_splits,
)

ASSISTANT_EN = "Tiny Llama"  # what the assistant says its name is
ASSISTANT_ZH = "小羊驼"
# dialogue kinds, in ChatWriter.dialogue's order (English, then Chinese). Repeat weighs most: in a
# 1,600-step trial with weights 4, 4, 1, 2 the name-copy head formed by step 800, but repeats were
# still wrong after the first word (0-1 of 12 exact), while story-qa tokens (whole stories) were 63%
# of the chat text. Greetings are few because they vary little.
KINDS = ["repeat", "story-qa", "greeting", "multi"]
WEIGHTS = [8, 2, 1, 3, 8, 2, 1, 3]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def match(pattern: str, text: str) -> re.Match:
    """re.search that fails loudly: the stories' wording is make_corpus.py's, fixed by its templates."""
    m = re.search(pattern, text)
    if m is None:
        raise ValueError(f"{pattern!r} not found in a generated story: {text[:80]!r}...")
    return m


class ChatWriter(Writer):
    """make_corpus's Writer (same word lists, one seeded RNG) plus dialogue methods."""

    # ---- what to repeat

    def en_copy_text(self) -> str:
        kind = self.r.choices(range(5), [3, 1, 3, 2, 3])[0]  # digits and word lists: no template to lean on
        if kind == 0:
            return self.en_sentence()
        if kind == 1:
            return f"{self.en_sentence()} {self.en_sentence()}"
        if kind == 2:
            return " ".join(self.r.choice("0123456789") for _ in range(self.r.randint(4, 8)))
        if kind == 3:
            f1, f2, f3 = self.r.sample(EN_FOODS, 3)
            return f"{f1}, {f2} and {f3}"
        pool = EN_COLORS + [x for x, _ in EN_OBJECTS] + EN_THINGS + EN_FOODS
        return ", ".join(self.r.sample(pool, self.r.randint(3, 6)))

    def zh_copy_text(self) -> str:
        kind = self.r.choices(range(5), [3, 1, 3, 2, 3])[0]  # digits and word lists: no template to lean on
        if kind == 0:
            return self.zh_sentence()
        if kind == 1:
            return self.zh_sentence() + self.zh_sentence()
        if kind == 2:
            return "".join(self.r.choice("零一二三四五六七八九") for _ in range(self.r.randint(4, 8)))
        if kind == 3:
            f1, f2, f3 = self.r.sample(ZH_FOODS, 3)
            return f"{f1}、{f2}和{f3}"
        pool = ZH_COLORS + [x for x, _ in ZH_OBJECTS] + ZH_FOODS
        return "、".join(self.r.sample(pool, self.r.randint(3, 6)))

    def en_repeat_turn(self) -> list[dict]:
        s = self.en_copy_text()
        ask = self.pick(
            ["Say this again: {}", "Please repeat: {}", "Repeat after me: {}", "Can you say it again? {}"]
        )
        return [user(ask.format(s)), assistant(s)]

    def zh_repeat_turn(self) -> list[dict]:
        s = self.zh_copy_text()
        ask = self.pick(["请再说一遍：{}", "请重复这句话：{}", "跟我说：{}", "你能再说一遍吗？{}"])
        return [user(ask.format(s)), assistant(s)]

    # ---- stories and questions about them

    def en_story_qa(self) -> list[dict]:
        story = self.en_story()
        n = match(r"named (\w+)\.", story).group(1)
        adj, animal = match(r"was(?: once)? an? (\w+) (\w+) named", story).groups()
        f = match(r"friend named (\w+)\.|with (?:his|her) friend (\w+)\.", story)
        f = f.group(1) or f.group(2)
        art, obj = match(r"found (an?) (\w+)", story).groups()
        food = match(r"to eat (.+?)(?: very much)?\.", story).group(1)
        q, ans = self.pick(
            [
                (f"What is the name of the {animal}?", f"{n} is the name of the {animal}."),
                (f"Who found the {obj}?", f"{n} found the {obj}."),
                (f"Who is the {adj} {animal}?", f"{n} is the {adj} {animal}."),
                (f"Who is {n}'s friend?", f"{f} is {n}'s friend."),
                (f"What did {n} find?", f"{n} found {art} {obj}."),
                (f"What does {n} like to eat?", f"{n} likes to eat {food}."),
            ]
        )
        return [user(f"{story}\n{q}"), assistant(ans)]

    def zh_story_qa(self) -> list[dict]:
        story = self.zh_story()
        mw, adj, animal, n = match(r"一(.)(\w+?)的(\w+?)，名字叫(\w+?)。", story).groups()
        f = match(r"好朋友叫(\w+?)。|和好朋友(\w+?)一起住在", story)
        f = f.group(1) or f.group(2)
        omw, obj = match(r"找到了一(.)(\w+?)。", story).groups()
        food = match(r"喜欢吃(\w+?)。", story).group(1)
        q, ans = self.pick(
            [
                (f"这{mw}{animal}叫什么名字？", f"{n}是这{mw}{animal}的名字。"),
                (f"谁找到了{obj}？", f"{n}找到了{obj}。"),
                (f"谁是那{mw}{adj}的{animal}？", f"{n}是那{mw}{adj}的{animal}。"),
                (f"{n}的好朋友是谁？", f"{f}是{n}的好朋友。"),
                (f"{n}找到了什么？", f"{n}找到了一{omw}{obj}。"),
                (f"{n}喜欢吃什么？", f"{n}喜欢吃{food}。"),
            ]
        )
        return [user(f"{story}\n{q}"), assistant(ans)]

    # ---- greetings

    def en_greeting(self) -> list[dict]:
        n = self.en_person(0.3)[0]
        return self.pick(
            [
                [
                    user(self.pick(["Hello!", "Hi!", "Hello, how are you?"])),
                    assistant("Hello! How can I help you today?"),
                ],
                [
                    user(self.pick(["Good morning!", "Good morning, friend!"])),
                    assistant("Good morning! How can I help you?"),
                ],
                [user(f"My name is {n}."), assistant(f"Nice to meet you, {n}!")],
                [user(f"Hi! I am {n}."), assistant(f"Hello, {n}! How can I help you today?")],
                [user("What is your name?"), assistant(f"My name is {ASSISTANT_EN}.")],
                [user(self.pick(["Thank you!", "Thanks!"])), assistant("You are welcome!")],
                [user(self.pick(["Goodbye!", "Bye!"])), assistant("Goodbye! Have a nice day!")],
            ]
        )

    def zh_greeting(self) -> list[dict]:
        n = self.zh_person(0.6)[0]
        return self.pick(
            [
                [user(self.pick(["你好！", "你好，你好吗？"])), assistant("你好！有什么可以帮你的吗？")],
                [user("早上好！"), assistant("早上好！有什么可以帮你的吗？")],
                [user(f"我叫{n}。"), assistant(f"{n}，你好！很高兴认识你。")],
                [user(f"你好！我是{n}。"), assistant(f"你好，{n}！有什么可以帮你的吗？")],
                [user("你叫什么名字？"), assistant(f"我叫{ASSISTANT_ZH}。")],
                [user(self.pick(["谢谢！", "谢谢你！"])), assistant("不客气！")],
                [user("再见！"), assistant("再见！祝你今天开心！")],
            ]
        )

    # ---- several turns

    def en_multi(self) -> list[dict]:
        n = self.en_person(0.3)[0]
        turns = [user(f"Hi! My name is {n}."), assistant(f"Hello, {n}! How can I help you today?")]
        turns += self.en_repeat_turn()
        if self.r.random() < 0.6:
            turns += [user("What is my name?"), assistant(f"Your name is {n}.")]
        return turns

    def zh_multi(self) -> list[dict]:
        n = self.zh_person(0.6)[0]
        turns = [user(f"你好！我叫{n}。"), assistant(f"你好，{n}！有什么可以帮你的吗？")]
        turns += self.zh_repeat_turn()
        if self.r.random() < 0.6:
            turns += [user("我叫什么名字？"), assistant(f"你叫{n}。")]
        return turns

    def dialogue(self) -> dict:
        makers = [
            self.en_repeat_turn, self.en_story_qa, self.en_greeting, self.en_multi,
            self.zh_repeat_turn, self.zh_story_qa, self.zh_greeting, self.zh_multi,
        ]  # fmt: skip
        i = self.r.choices(range(len(makers)), WEIGHTS)[0]
        lang = "en" if i < len(KINDS) else "zh"
        return {"kind": f"{lang}-{KINDS[i % len(KINDS)]}", "messages": makers[i]()}


def generate(seed: int, n: int, exclude: set[str] = frozenset()) -> list[str]:
    """n dialogues from `seed` as JSON lines, skipping any in `exclude`."""
    w, out = ChatWriter(seed), []
    while len(out) < n:
        line = json.dumps(w.dialogue(), ensure_ascii=False)
        if line not in exclude:
            out.append(line)
    return out


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=here, help="directory for chat_train.jsonl and chat_val.jsonl"
    )
    ap.add_argument("--seed", type=int, default=4321, help="train seed; val uses seed + 1000")
    ap.add_argument("--train", type=int, default=9000, help="training dialogues")
    ap.add_argument("--val", type=int, default=400, help="validation dialogues")
    args = ap.parse_args()

    train = generate(args.seed, args.train)
    val = generate(args.seed + 1000, args.val, exclude=set(train))
    write_splits(args.out, [("chat_train.jsonl", train), ("chat_val.jsonl", val)], "dialogues")


if __name__ == "__main__":
    main()
