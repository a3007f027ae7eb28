"""Generate the sample model's bilingual (English + Chinese) corpus from templates and word lists.

    python samples/corpus/make_corpus.py            # writes train.txt and val.txt next to this file

Output format: one document per line, UTF-8, no blank lines. The training token stream is
each line's ids followed by <|endoftext|> (see samples/train_sample.py).

Every story and most other documents name their characters at random (32 English names or
invented ones; Chinese surname + given name), so writing a character's name again can only
be done by looking back at its earlier mention: the name-copy attention the audit demo shows
(samples/find_patterns.py). Echo and memory-game documents (a sentence, list or digit code
said twice) add more text that only copying predicts.

val.txt is drawn from its own seed, and any document that also occurs in train.txt is
dropped from it, so it is held out text, not a subset of the training text.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

# Word lists, kept compact (formatter off): one item per line would triple the file.
# fmt: off
# ---------------------------------------------------------------------------- English words

# (name, pronoun, possessive)
EN_PEOPLE = [
    ("Tom", "he", "his"), ("Anna", "she", "her"), ("Lily", "she", "her"), ("Max", "he", "his"),
    ("Sam", "he", "his"), ("Ben", "he", "his"), ("Emma", "she", "her"), ("Lucy", "she", "her"),
    ("Jack", "he", "his"), ("Mia", "she", "her"), ("Leo", "he", "his"), ("Nora", "she", "her"),
    ("Oliver", "he", "his"), ("Ella", "she", "her"), ("Jake", "he", "his"), ("Zoe", "she", "her"),
    ("Ruby", "she", "her"), ("Finn", "he", "his"), ("Grace", "she", "her"), ("Henry", "he", "his"),
    ("Ivy", "she", "her"), ("Kate", "she", "her"), ("Luke", "he", "his"), ("Mary", "she", "her"),
    ("Nick", "he", "his"), ("Owen", "he", "his"), ("Paul", "he", "his"), ("Rose", "she", "her"),
    ("Tim", "he", "his"), ("Amy", "she", "her"), ("Dan", "he", "his"), ("Sara", "she", "her"),
]
EN_SYLLABLES = [
    "ba", "bo", "da", "di", "ka", "ki", "la", "li", "lo", "ma", "mi", "mo", "na", "ni", "pa", "pi", "ra",
    "ri", "sa", "so", "ta", "ti", "to", "zi",
]
# (singular, article)
EN_ANIMALS = [
    ("cat", "a"), ("dog", "a"), ("rabbit", "a"), ("bird", "a"), ("fox", "a"), ("bear", "a"), ("duck", "a"),
    ("mouse", "a"), ("frog", "a"), ("pig", "a"), ("horse", "a"), ("owl", "an"), ("tiger", "a"), ("lion", "a"),
    ("sheep", "a"), ("cow", "a"), ("monkey", "a"), ("panda", "a"), ("turtle", "a"), ("goat", "a"),
    ("squirrel", "a"), ("hen", "a"), ("wolf", "a"), ("deer", "a"),
]
EN_ADJ = [
    "small", "big", "little", "old", "young", "happy", "kind", "brave", "clever", "quiet", "funny", "lazy",
    "shy", "busy", "gentle", "curious",
]
EN_COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange", "pink", "gray"]
EN_FOODS = [
    "apples", "bananas", "rice", "noodles", "bread", "cake", "fish", "eggs", "carrots", "oranges", "grapes",
    "soup", "cookies", "cheese", "ice cream", "dumplings", "tomatoes", "pears", "honey", "corn",
    "strawberries", "potatoes", "pancakes", "peaches",
]
EN_MASS = {"bread", "cake", "cheese", "corn", "fish", "honey", "ice cream", "rice", "soup"}
# (go phrase, at phrase)
EN_PLACES = [
    ("to the park", "in the park"), ("to the river", "by the river"), ("to the forest", "in the forest"),
    ("to the market", "at the market"), ("to school", "at school"), ("to the library", "in the library"),
    ("to the beach", "on the beach"), ("to the garden", "in the garden"), ("to the hill", "on the hill"),
    ("to the lake", "by the lake"), ("to the farm", "on the farm"), ("to the zoo", "at the zoo"),
    ("to the village", "in the village"), ("to the city", "in the city"), ("to the field", "in the field"),
]
# (base, third person, past)
EN_ACTS = [
    ("play", "plays", "played"), ("read books", "reads books", "read books"), ("swim", "swims", "swam"),
    ("sing songs", "sings songs", "sang songs"), ("draw pictures", "draws pictures", "drew pictures"),
    ("fly a kite", "flies a kite", "flew a kite"), ("ride a bike", "rides a bike", "rode a bike"),
    ("catch fish", "catches fish", "caught fish"),
    ("look at the stars", "looks at the stars", "looked at the stars"),
    ("pick flowers", "picks flowers", "picked flowers"), ("run", "runs", "ran"),
    ("dance", "dances", "danced"), ("write letters", "writes letters", "wrote letters"),
    ("play football", "plays football", "played football"), ("take a walk", "takes a walk", "took a walk"),
    ("watch the birds", "watches the birds", "watched the birds"),
]
EN_TIMES = [
    "every morning", "every evening", "every afternoon", "on Sundays", "after school", "every night",
    "in the spring", "in the summer", "in the winter", "on Saturdays",
]
# (object, article)
EN_OBJECTS = [
    ("ball", "a"), ("box", "a"), ("key", "a"), ("hat", "a"), ("book", "a"), ("shell", "a"), ("map", "a"),
    ("kite", "a"), ("stone", "a"), ("cup", "a"), ("bell", "a"), ("feather", "a"), ("coin", "a"),
    ("umbrella", "an"), ("egg", "an"), ("letter", "a"), ("ring", "a"), ("lamp", "a"),
]
EN_THINGS = [
    "tree", "table", "bridge", "house", "chair", "wall", "rock", "bed", "door", "fence", "boat", "window",
]
EN_PREPS = ["under", "near", "on", "behind", "next to", "in front of"]
# (third person, -ing)
EN_MOVES = [
    ("sleeps", "sleeping"), ("sits", "sitting"), ("plays", "playing"), ("sings", "singing"),
    ("hides", "hiding"), ("waits", "waiting"), ("jumps", "jumping"), ("eats", "eating"),
]
EN_DIGITS = "0123456789"

# ---------------------------------------------------------------------------- Chinese words

ZH_FIXED = [
    ("小明", "他"), ("小红", "她"), ("小华", "他"), ("小刚", "他"), ("小丽", "她"), ("小芳", "她"), ("小强", "他"), ("小军", "他"),
    ("小美", "她"), ("小龙", "他"), ("小兰", "她"), ("小雨", "她"), ("小东", "他"), ("小玲", "她"),
]
ZH_SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡林郭何高罗")
ZH_GIVEN = list("明华红丽强军伟芳娜静敏磊洋勇杰涛浩宇欣怡晨雪云月星海山林文新安乐佳嘉思雨天成志春秋冬夏")
# (animal, measure word)
ZH_ANIMALS = [
    ("小猫", "只"), ("小狗", "只"), ("小兔子", "只"), ("小鸟", "只"), ("狐狸", "只"), ("熊", "头"), ("小鸭子", "只"), ("老鼠", "只"),
    ("青蛙", "只"), ("小猪", "只"), ("马", "匹"), ("猫头鹰", "只"), ("老虎", "只"), ("狮子", "头"), ("羊", "只"), ("牛", "头"),
    ("猴子", "只"), ("熊猫", "只"), ("乌龟", "只"), ("松鼠", "只"), ("鸡", "只"), ("狼", "只"), ("鹿", "只"), ("山羊", "只"),
]
ZH_ADJ = ["小小", "可爱", "聪明", "勇敢", "善良", "安静", "快乐", "调皮", "胆小", "好奇"]
ZH_COLORS = ["红色", "蓝色", "绿色", "黄色", "白色", "黑色", "棕色", "橙色", "粉色", "灰色"]
ZH_FOODS = [
    "苹果", "香蕉", "米饭", "面条", "面包", "蛋糕", "鱼", "鸡蛋", "胡萝卜", "橘子", "葡萄", "饺子", "包子", "西瓜", "梨", "蜂蜜", "玉米", "草莓",
    "豆腐", "土豆", "桃子", "饼干",
]
ZH_PLACES = ["公园", "河边", "森林", "市场", "学校", "图书馆", "海边", "花园", "山上", "湖边", "农场", "动物园", "村子", "城里", "田野"]
ZH_ACTS = [
    "玩", "看书", "游泳", "唱歌", "画画", "放风筝", "骑自行车", "钓鱼", "看星星", "摘花", "跑步", "跳舞", "写信", "踢足球", "散步", "看小鸟",
]
ZH_TIMES = ["每天早上", "每天晚上", "每天下午", "星期天", "放学以后", "星期六", "春天的时候", "夏天的时候", "冬天的时候"]
# (object, measure word)
ZH_OBJECTS = [
    ("球", "个"), ("盒子", "个"), ("钥匙", "把"), ("帽子", "顶"), ("书", "本"), ("贝壳", "个"), ("地图", "张"), ("风筝", "个"),
    ("石头", "块"), ("杯子", "个"), ("铃铛", "个"), ("羽毛", "根"), ("硬币", "枚"), ("雨伞", "把"), ("信", "封"), ("戒指", "枚"),
    ("灯", "盏"),
]
ZH_THINGS = ["大树", "桌子", "小桥", "房子", "椅子", "墙", "石头", "床", "门", "篱笆", "小船", "窗户"]
ZH_SIDES = ["下面", "旁边", "上面", "后面", "前面"]
ZH_DIGITS = "零一二三四五六七八九"
ZH_HOURS = ["六", "七", "八"]
# fmt: on


def a(word: str) -> str:
    """English indefinite article for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


# document kinds, in Writer.document's order: story, routine, likes, echo, game (English, then Chinese)
WEIGHTS = [4, 3, 2, 2, 1, 4, 3, 2, 2, 1]


class Writer:
    """Draws words from one seeded RNG; every document is a method returning one line."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def pick(self, seq):
        return self.r.choice(seq)

    # ---- names

    def en_person(self, invented_p: float = 0.3):
        """A person from the list, or an invented name (2-3 syllables) that must be copied."""
        if self.r.random() < invented_p:
            n = self.r.choice([2, 2, 2, 3])
            name = "".join(self.r.choice(EN_SYLLABLES) for _ in range(n)).capitalize()
            return (name,) + self.r.choice([("he", "his"), ("she", "her")])
        return self.pick(EN_PEOPLE)

    def en_two_people(self, invented_p: float = 0.3):
        one, two = self.en_person(invented_p), self.en_person(invented_p)
        while two[0] == one[0]:
            two = self.en_person(invented_p)
        return one, two

    def zh_person(self, invented_p: float = 0.6):
        if self.r.random() < invented_p:
            given = "".join(self.r.choice(ZH_GIVEN) for _ in range(self.r.choice([1, 2, 2])))
            return self.pick(ZH_SURNAMES) + given, self.r.choice(["他", "她"])
        return self.pick(ZH_FIXED)

    def zh_two_people(self, invented_p: float = 0.6):
        one, two = self.zh_person(invented_p), self.zh_person(invented_p)
        while two[0] == one[0]:
            two = self.zh_person(invented_p)
        return one, two

    # ---- English documents

    def en_story(self) -> str:
        (n, he, his), (f, _, _) = self.en_two_people(0.3)
        animal, _ = self.pick(EN_ANIMALS)
        adj = self.pick(EN_ADJ)
        food = self.pick(EN_FOODS)
        go, _ = self.pick(EN_PLACES)
        _, at = self.pick(EN_PLACES)
        act = self.pick(EN_ACTS)
        obj, oart = self.pick(EN_OBJECTS)
        color = self.pick(EN_COLORS)
        time = self.pick(EN_TIMES)
        opening = self.pick(["Once upon a time, there was", "Long ago, there was", "There was once"])
        s = [f"{opening} {a(adj)} {adj} {animal} named {n}."]
        s.append(self.pick([f"{n} lived {at} with {his} friend {f}.", f"{n} had a friend named {f}."]))
        s.append(
            self.pick([f"{n} liked to eat {food}.", f"{he.capitalize()} liked to eat {food} very much."])
        )
        s.append(f"{time[0].upper()}{time[1:]}, {n} went {go} to {act[0]}.")
        s.append(f"One day, {n} found {oart} {obj} {at}.")
        s.append(self.pick([f'"What is this?" said {n}.', f"{n} looked at the {obj} for a long time."]))
        s.append(f"{he.capitalize()} took the {obj} home and showed it to {f}.")
        s.append(f'{f} said, "{n}, this is {a(color)} {color} {obj}!"')
        s.append(self.pick([f"{n} was very happy.", f"{n} smiled.", f"{n} and {f} laughed."]))
        s.append(
            self.pick(
                [
                    f"From that day on, {n} and {f} were good friends.",
                    f"After that, {n} kept the {color} {obj} in {his} room.",
                    f"The next day, {n} and {f} went {go} together.",
                ]
            )
        )
        return " ".join(s)

    def en_routine(self) -> str:
        n, he, his = self.en_person(0.2)
        He = he.capitalize()
        hour = self.pick(["six", "seven", "eight"])
        food = self.pick(EN_FOODS)
        go, at = self.pick(EN_PLACES)
        act = self.pick(EN_ACTS)
        act2 = self.pick(EN_ACTS)
        s = [
            f"{n} is {self.r.randint(5, 12)} years old.",
            f"Every morning {n} gets up at {hour} o'clock.",
            f"{He} eats {food} for breakfast.",
            self.pick([f"Then {n} goes to school.", f"Then {n} goes {go}."]),
            f"In the afternoon {n} {act[1]} {at}.",
            self.pick([f"In the evening {he} {act2[1]}.", f"At night {n} reads a book and goes to bed."]),
            self.pick([f"{n} likes {his} day.", f"Tomorrow {n} will {act2[0]} again."]),
        ]
        return " ".join(s)

    def en_likes(self) -> str:
        (n, he, _), (f, _, _) = self.en_two_people(0.3)
        f1, f2 = self.r.sample(EN_FOODS, 2)
        s = self.pick(
            [
                [
                    f"{n} likes to eat {f1}.",
                    f"{n} does not like {f2}.",
                    f"{f} likes {f2} very much.",
                    f"So {n} gives the {f2} to {f}, and {f} gives the {f1} to {n}.",
                    "They are both happy.",
                ],
                [
                    f"{he.capitalize()} likes to eat {f1}.",
                    f"{n} eats {f1} every day.",
                    f'{f} asks, "{n}, why do you like {f1}?"',
                    f'{n} says, "Because {f1} {"is" if f1 in EN_MASS else "are"} good for me."',
                ],
                [
                    f"What does {n} like to eat?",
                    f"{n} likes to eat {f1}.",
                    f"What does {f} like to eat?",
                    f"{f} likes to eat {f2}.",
                ],
            ]
        )
        return " ".join(s)

    def en_sentence(self) -> str:
        """A random sentence with ~10^6 variants: predictable on a second telling only by copying."""
        c, (an, _), (m, _), p, adj, t = (
            self.pick(EN_COLORS),
            self.pick(EN_ANIMALS),
            self.pick(EN_MOVES),
            self.pick(EN_PREPS),
            self.pick(EN_ADJ),
            self.pick(EN_THINGS),
        )
        return self.pick(
            [
                f"The {c} {an} {m} {p} the {adj} {t}.",
                f"{a(adj).capitalize()} {adj} {an} is {self.pick(EN_MOVES)[1]} {p} the {c} {t}.",
            ]
        )

    def en_echo(self) -> str:
        (n, _, _), (f, _, _) = self.en_two_people(0.3)
        kind = self.r.choices(range(6), [4, 1, 2, 2, 1, 2])[0]
        if kind == 0:
            s = self.en_sentence()
            return self.pick(
                [
                    f'{n} said, "{s}" Then {f} said it again: "{s}"',
                    f"{n} wrote on the board: {s} The children read it out loud: {s}",
                    f'{n} said, "{s}" {f} did not hear, so {n} said it again: "{s}"',
                    f"{n} likes to sing a little song: {s} {s} {s}",
                ]
            )
        if kind == 1:
            s1, s2 = self.en_sentence(), self.en_sentence()
            return f'{n} told {f} a short story: "{s1} {s2}" {f} told it back: "{s1} {s2}"'
        if kind == 2:
            f1, f2, f3 = self.r.sample(EN_FOODS, 3)
            return (
                f"{n} went to the market and bought {f1}, {f2} and {f3}. At home, {f} asked, "
                f'"What did you buy?" {n} said, "I bought {f1}, {f2} and {f3}."'
            )
        if kind == 3:
            code = " ".join(self.r.choice(EN_DIGITS) for _ in range(self.r.randint(4, 8)))
            return f'The secret code is {code}. {n} told {f} the code. {f} said, "The code is {code}."'
        if kind == 4:
            kids = [self.en_person(0.5)[0] for _ in range(self.r.randint(3, 4))]
            names = ", ".join(kids[:-1]) + " and " + kids[-1]
            return (
                f'There are new children in {n}\'s class: {names}. The teacher said, "Good morning, {names}!"'
            )
        (an, _), c = self.pick(EN_ANIMALS), self.pick(EN_COLORS)
        obj, _ = self.pick(EN_OBJECTS)
        return (
            f"{n} has {a(c)} {c} {obj} and a pet {an} named {f}. Every day {n} plays with {f}. "
            f"{f} likes the {c} {obj}. {n} and {f} are best friends."
        )

    def en_game(self) -> str:
        """A memory game: a list of random words said twice. Only copying predicts the second list."""
        (n, _, _), (f, _, _) = self.en_two_people(0.3)
        pool = EN_COLORS + [x for x, _ in EN_ANIMALS] + EN_FOODS + [x for x, _ in EN_OBJECTS] + EN_THINGS
        words = ", ".join(self.r.sample(pool, self.r.randint(5, 10)))
        return self.pick(
            [
                f"{n} and {f} play a memory game. {n} says: {words}. {f} says: {words}.",
                f"{n} reads a list to {f}: {words}. {f} reads it back: {words}.",
            ]
        )

    # ---- Chinese documents

    def zh_story(self) -> str:
        (n, ta), (f, _) = self.zh_two_people(0.7)
        animal, mw = self.pick(ZH_ANIMALS)
        adj, food, p1, p2, p3 = (
            self.pick(ZH_ADJ),
            self.pick(ZH_FOODS),
            self.pick(ZH_PLACES),
            self.pick(ZH_PLACES),
            self.pick(ZH_PLACES),
        )
        act, time, color = self.pick(ZH_ACTS), self.pick(ZH_TIMES), self.pick(ZH_COLORS)
        obj, omw = self.pick(ZH_OBJECTS)
        opening = self.pick(["从前，有", "很久以前，有", "在一个小村子里，有"])
        s = [
            f"{opening}一{mw}{adj}的{animal}，名字叫{n}。",
            self.pick([f"{n}住在{p1}，{ta}有一个好朋友叫{f}。", f"{n}和好朋友{f}一起住在{p1}。"]),
            self.pick([f"{n}最喜欢吃{food}。", f"{ta}很喜欢吃{food}。"]),
            f"{time}，{n}都会去{p2}{act}。",
            f"有一天，{n}在{p3}找到了一{omw}{obj}。",
            self.pick([f"{n}说：“这是什么？”", f"{n}看了这{omw}{obj}很久。"]),
            f"{ta}把{obj}带回家，给{f}看。",
            f"{f}说：“{n}，这是一{omw}{color}的{obj}！”",
            self.pick([f"{n}非常高兴。", f"{n}笑了。", f"{n}和{f}都笑了。"]),
            self.pick(
                [
                    f"从那天起，{n}和{f}成了最好的朋友。",
                    f"后来，{n}一直把{obj}放在自己的房间里。",
                    f"第二天，{n}和{f}一起去了{p2}。",
                ]
            ),
        ]
        return "".join(s)

    def zh_routine(self) -> str:
        n, ta = self.zh_person(0.4)
        food, place, act, act2 = (
            self.pick(ZH_FOODS),
            self.pick(ZH_PLACES),
            self.pick(ZH_ACTS),
            self.pick(ZH_ACTS),
        )
        s = [
            f"{n}今年{self.pick(['五', '六', '七', '八', '九', '十', '十一', '十二'])}岁。",
            f"{n}每天早上{self.pick(ZH_HOURS)}点起床。",
            f"{ta}早饭吃{food}。",
            self.pick([f"然后{n}去学校。", f"然后{n}去{place}。"]),
            f"下午{n}在{place}{act}。",
            self.pick([f"晚上{ta}{act2}。", f"晚上{n}看一会儿书，然后睡觉。"]),
            self.pick([f"{n}很喜欢这样的一天。", f"明天{n}还要去{act2}。"]),
        ]
        return "".join(s)

    def zh_likes(self) -> str:
        (n, ta), (f, ta2) = self.zh_two_people(0.5)
        f1, f2 = self.r.sample(ZH_FOODS, 2)
        return "".join(
            self.pick(
                [
                    [
                        f"{n}喜欢吃{f1}，不喜欢吃{f2}。",
                        f"{f}很喜欢吃{f2}。",
                        f"所以{n}把{f2}给了{f}，{f}把{f1}给了{n}。",
                        "他们都很高兴。",
                    ],
                    [
                        f"{ta}喜欢吃{f1}。",
                        f"{n}每天都吃{f1}。",
                        f"{f}问：“{n}，你为什么喜欢吃{f1}？”",
                        f"{n}说：“因为{f1}很好吃。”",
                    ],
                    [f"{n}喜欢吃什么？", f"{n}喜欢吃{f1}。", f"{f}喜欢吃什么？", f"{ta2}喜欢吃{f2}。"],
                ]
            )
        )

    def zh_sentence(self) -> str:
        c, (a, mw), t, side, act = (
            self.pick(ZH_COLORS),
            self.pick(ZH_ANIMALS),
            self.pick(ZH_THINGS),
            self.pick(ZH_SIDES),
            self.pick(ZH_ACTS),
        )
        return self.pick(
            [f"{c}的{a}在{t}{side}{act}。", f"一{mw}{self.pick(ZH_ADJ)}的{a}在{c}的{t}{side}睡觉。"]
        )

    def zh_echo(self) -> str:
        (n, _), (f, _) = self.zh_two_people(0.5)
        kind = self.r.choices(range(6), [4, 1, 2, 2, 1, 2])[0]
        if kind == 0:
            s = self.zh_sentence()
            return self.pick(
                [
                    f"{n}说：“{s}”{f}跟着说：“{s}”",
                    f"老师在黑板上写：{s}同学们一起读：{s}",
                    f"{n}说：“{s}”{f}没有听清楚，{n}又说了一遍：“{s}”",
                    f"{n}喜欢唱一首小歌：{s}{s}{s}",
                ]
            )
        if kind == 1:
            s1, s2 = self.zh_sentence(), self.zh_sentence()
            return f"{n}给{f}讲了一个小故事：“{s1}{s2}”{f}又讲了一遍：“{s1}{s2}”"
        if kind == 2:
            f1, f2, f3 = self.r.sample(ZH_FOODS, 3)
            return (
                f"{n}去市场买了{f1}、{f2}和{f3}。回到家，{f}问：“你买了什么？”"
                f"{n}说：“我买了{f1}、{f2}和{f3}。”"
            )
        if kind == 3:
            code = "".join(self.r.choice(ZH_DIGITS) for _ in range(self.r.randint(4, 8)))
            return f"密码是{code}。{n}把密码告诉了{f}。{f}说：“密码是{code}。”"
        if kind == 4:
            kids = [self.zh_person(0.8)[0] for _ in range(self.r.randint(3, 4))]
            names = "、".join(kids[:-1]) + "和" + kids[-1]
            return f"{n}的班上来了几个新同学：{names}。老师说：“{names}，早上好！”"
        (an, mw), c = self.pick(ZH_ANIMALS), self.pick(ZH_COLORS)
        obj, omw = self.pick(ZH_OBJECTS)
        return (
            f"{n}有一{omw}{c}的{obj}，还有一{mw}{an}叫{f}。{n}每天都和{f}一起玩。"
            f"{f}很喜欢那{omw}{c}的{obj}。{n}和{f}是最好的朋友。"
        )

    def zh_game(self) -> str:
        (n, _), (f, _) = self.zh_two_people(0.5)
        pool = ZH_COLORS + [x for x, _ in ZH_ANIMALS] + ZH_FOODS + [x for x, _ in ZH_OBJECTS] + ZH_THINGS
        words = "、".join(self.r.sample(pool, self.r.randint(5, 10)))
        return self.pick(
            [
                f"{n}和{f}玩记忆游戏。{n}说：{words}。{f}说：{words}。",
                f"{n}给{f}念了一张单子：{words}。{f}又念了一遍：{words}。",
            ]
        )

    def document(self) -> str:
        kinds = [
            self.en_story,
            self.en_routine,
            self.en_likes,
            self.en_echo,
            self.en_game,
            self.zh_story,
            self.zh_routine,
            self.zh_likes,
            self.zh_echo,
            self.zh_game,
        ]
        weights = WEIGHTS
        return self.r.choices(kinds, weights)[0]()


def generate(seed: int, n_bytes: int, exclude: set[str] = frozenset()) -> list[str]:
    """Documents from `seed` until their UTF-8 size reaches n_bytes, skipping any in `exclude`."""
    w, docs, size = Writer(seed), [], 0
    while size < n_bytes:
        d = w.document()
        if d in exclude:
            continue
        docs.append(d)
        size += len(d.encode("utf-8")) + 1
    return docs


def write_splits(out: Path, splits: list[tuple[str, list[str]]], unit: str) -> None:
    """Write each (file name, lines) split to `out`, one line each with LF endings, and say its size."""
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in splits:
        path = out / name
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")
        print(f"wrote {path} ({len(lines)} {unit}, {path.stat().st_size} bytes)")


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=here, help="directory for train.txt and val.txt")
    ap.add_argument("--seed", type=int, default=1234, help="train seed; val uses seed + 1000")
    ap.add_argument("--train-bytes", type=int, default=1_800_000)
    ap.add_argument("--val-bytes", type=int, default=120_000)
    args = ap.parse_args()

    train = generate(args.seed, args.train_bytes)
    val = generate(args.seed + 1000, args.val_bytes, exclude=set(train))
    write_splits(args.out, [("train.txt", train), ("val.txt", val)], "documents")


if __name__ == "__main__":
    main()
