"""The demo instruction data the package ships (minipeft/assets/demo_data/): bilingual tasks whose answers can be
checked exactly, their generator, and TASKS (each task's one instruction, by which the comparison scores per task).

    python tools/make_demo_data.py --out minipeft/assets/demo_data --seed 0      (its command line)

Every record is Alpaca-format {"instruction", "input", "output"}; each task uses one fixed instruction, so
the task of a record can be read off its instruction (TASKS below). The answers are short (1 to ~8 tokens)
so a tiny model can learn them in a short CPU fine-tune:

  sentiment_en   a short review built from word lists  -> positive | negative | neutral
  sentiment_zh   一条短评                               -> 积极 | 消极 | 中立
  number_to_zh   an integer 0..9999 in digits           -> Chinese numerals, e.g. 305 -> 三百零五
  zh_to_number   Chinese numerals                       -> the integer in digits, e.g. 一千零五十 -> 1050
  reverse_en     3 English words, comma-separated       -> the same words in reverse order
  reverse_zh     3 个中文词语，用逗号分隔                -> 倒序
  sort_en        3 English words                        -> sorted alphabetically
  upper_en       one English word                       -> the word in capital letters

All candidate records are drawn with one seeded random.Random, made unique by (instruction, input), shuffled,
and split: the first --heldout-size records form heldout.json, the next --train-size form train.json, so no
held-out question appears in the training set. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ZH_DIGITS = "零一二三四五六七八九"
ZH_UNITS = ["", "十", "百", "千"]          # 10^0 .. 10^3


def number_to_chinese(n: int) -> str:
    """0..9999 -> Chinese numerals in the usual reading: 10 -> 十, 15 -> 十五, 110 -> 一百一十, 305 -> 三百零五,
    1050 -> 一千零五十, 1005 -> 一千零五, 1000 -> 一千. A run of zeros between non-zero digits reads as one 零;
    trailing zeros are not read; a leading 一 before 十 is dropped only when 十 is the highest place."""
    if not 0 <= n <= 9999:
        raise ValueError(f"number_to_chinese handles 0..9999, got {n}")
    if n == 0:
        return "零"
    digits = [int(c) for c in str(n)]                   # most significant first
    out, pending_zero = [], False
    for i, d in enumerate(digits):
        place = len(digits) - 1 - i                     # 3 = thousands, ..., 0 = ones
        if d == 0:
            pending_zero = True
            continue
        if pending_zero and out:
            out.append("零")
        pending_zero = False
        if not (d == 1 and place == 1 and i == 0):      # 十五, not 一十五; but 一百一十
            out.append(ZH_DIGITS[d])
        out.append(ZH_UNITS[place])
    return "".join(out)


def chinese_to_number(text: str) -> int:
    """Inverse of number_to_chinese for its outputs: 三百零五 -> 305, 十五 -> 15, 零 -> 0."""
    unit_values = {"十": 10, "百": 100, "千": 1000}
    total, digit = 0, None
    for ch in text:
        if ch in unit_values:
            total += (1 if digit is None else digit) * unit_values[ch]
            digit = None
        elif ch in ZH_DIGITS:
            digit = ZH_DIGITS.index(ch)
        else:
            raise ValueError(f"not a Chinese numeral: {text!r} (character {ch!r})")
    return total + (digit or 0)


# ---- word lists -------------------------------------------------------------------------------------
EN_SUBJECTS = ["the movie", "the hotel room", "this phone", "the service", "the coffee", "this book",
               "the delivery", "the concert", "the pizza", "this laptop"]
EN_ADJECTIVES = {
    "positive": ["great", "excellent", "wonderful", "delicious", "friendly", "amazing", "perfect", "lovely"],
    "negative": ["terrible", "awful", "broken", "boring", "rude", "disappointing", "dirty", "slow"],
    "neutral": ["average", "ordinary", "acceptable", "typical", "standard", "so-so"],
}
ZH_SUBJECTS = ["这部电影", "这家餐厅", "这本书", "这款手机", "这次旅行", "这家酒店", "这杯咖啡", "这场音乐会",
               "这个老师的课", "这里的服务"]
ZH_PREDICATES = {
    "积极": ["很好", "非常棒", "很精彩", "让人满意", "很舒服", "值得推荐", "太好了", "很喜欢"],
    "消极": ["很差", "太糟糕了", "令人失望", "很难用", "不值得", "很失望", "太贵了", "不喜欢"],
    "中立": ["一般", "还行", "马马虎虎", "中规中矩", "普普通通", "不好不坏"],
}
EN_WORDS = ["apple", "river", "stone", "cloud", "green", "house", "music", "tiger", "bread", "chair",
            "light", "ocean", "paper", "smile", "train", "water", "garden", "silver", "winter", "yellow",
            "horse", "candle", "forest", "lemon"]
# Chinese words whose characters are common in the poems, so the shipped tokenizer has a piece for each.
ZH_WORDS = ["河流", "石头", "老师", "学校", "音乐", "太阳", "大海", "春天", "书本", "小鸟", "山峰", "星星",
            "火车", "白云", "明月", "青山", "江水", "秋风", "高楼", "红花"]

TASKS = {
    "sentiment_en": "Classify the sentiment of the review as positive, negative or neutral.",
    "sentiment_zh": "判断这条评论的情感：积极、消极或中立。",
    "number_to_zh": "把阿拉伯数字写成中文数字。",
    "zh_to_number": "Write the Chinese numeral as an Arabic number.",
    "reverse_en": "Reverse the order of the words.",
    "reverse_zh": "把这些词语倒过来排列。",
    "sort_en": "Sort the words in alphabetical order.",
    "upper_en": "Write the word in capital letters.",
}
TASK_WEIGHTS = {"sentiment_en": 3, "sentiment_zh": 3, "number_to_zh": 3, "zh_to_number": 2,
                "reverse_en": 2, "reverse_zh": 2, "sort_en": 2, "upper_en": 1}


def make_task(task: str, rng: random.Random):
    """One (input, output) pair of the given task."""
    if task == "sentiment_en":
        label = rng.choice(sorted(EN_ADJECTIVES))
        adjectives = rng.sample(EN_ADJECTIVES[label], rng.choice([1, 2]))
        review = f"{rng.choice(EN_SUBJECTS).capitalize()} was {' and '.join(adjectives)}."
        return review, label
    if task == "sentiment_zh":
        label = rng.choice(sorted(ZH_PREDICATES))
        predicates = rng.sample(ZH_PREDICATES[label], rng.choice([1, 2]))
        return f"{rng.choice(ZH_SUBJECTS)}{'，'.join(predicates)}。", label
    if task == "number_to_zh":
        n = random_number(rng)
        return str(n), number_to_chinese(n)
    if task == "zh_to_number":
        n = random_number(rng)
        return number_to_chinese(n), str(n)
    if task in ("reverse_en", "sort_en"):
        words = rng.sample(EN_WORDS, 3)
        answer = list(reversed(words)) if task == "reverse_en" else sorted(words)
        return ", ".join(words), ", ".join(answer)
    if task == "reverse_zh":
        words = rng.sample(ZH_WORDS, 3)
        return "，".join(words), "，".join(reversed(words))
    if task == "upper_en":
        word = rng.choice(EN_WORDS + [w for ws in EN_ADJECTIVES.values() for w in ws])
        return word, word.upper()
    raise ValueError(f"unknown task {task!r}")


def random_number(rng: random.Random) -> int:
    """Numbers of every length, with the tricky zeros common: 1-2 digits, 3 digits, 4 digits, round ones."""
    kind = rng.choice(["small", "hundreds", "thousands", "round"])
    if kind == "small":
        return rng.randint(0, 99)
    if kind == "hundreds":
        return rng.randint(100, 999)
    if kind == "thousands":
        return rng.randint(1000, 9999)
    return rng.choice([10, 100, 1000]) * rng.randint(1, 9) + rng.choice([0, 0, rng.randint(1, 9)])


def generate(seed: int, train_size: int, heldout_size: int):
    """-> (train records, held-out records), disjoint by (instruction, input)."""
    rng = random.Random(seed)
    names = sorted(TASK_WEIGHTS)
    weights = [TASK_WEIGHTS[n] for n in names]
    records, seen = [], set()
    wanted = train_size + heldout_size
    attempts = 0
    while len(records) < wanted:
        attempts += 1
        if attempts > 100 * wanted:
            raise ValueError(f"cannot draw {wanted} distinct records from the word lists; ask for fewer")
        task = rng.choices(names, weights)[0]
        task_input, output = make_task(task, rng)
        key = (TASKS[task], task_input)
        if key in seen:
            continue
        seen.add(key)
        records.append({"instruction": TASKS[task], "input": task_input, "output": output})
    rng.shuffle(records)
    return records[heldout_size:], records[:heldout_size]


def write_json(path: Path, records) -> None:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_demo_data(out: Path, seed: int = 0, train_size: int = 1600, heldout_size: int = 160,
                    overwrite: bool = False):
    """generate() into the folder out/ (train.json and heldout.json), which appears whole or not at all; an existing
    `out` is replaced only with overwrite (--overwrite). -> (training records, held-out records)."""
    from .fileio import atomic_folder
    train, heldout = generate(seed, train_size, heldout_size)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        write_json(tmp / "train.json", train)
        write_json(tmp / "heldout.json", heldout)
    return train, heldout
