"""Seeded synthetic reasoning data for the embedded demo.

Multi-step arithmetic word problems from several story templates at difficulty levels 1–3 (the
number of arithmetic steps), each with a step-by-step solution in ``<think>…</think>`` followed by
``\\boxed{answer}`` and a known integer answer. From them: a training pool whose rows carry a sample
``type`` (seed 003's pool), an evaluation set in MATH format, control prompts that need no reasoning
(seed 001's contrasts) and a pre-training corpus. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
POOL_TYPES = ("canonical", "paraphrase", "terse", "wrong")

NAMES = [
    "Ana", "Ben", "Carla", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jun",
    "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara",
]  # fmt: skip
ITEMS = ["pencils", "apples", "stickers", "marbles", "cards", "shells", "coins", "buttons"]


@dataclass(frozen=True)
class Step:
    """One arithmetic step: what it computes (words), the expression, and its value."""

    what: str
    expr: str
    value: int


@dataclass(frozen=True)
class Problem:
    """A word problem with its reasoning steps and integer answer."""

    template: str
    level: int
    question: str
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def answer(self) -> int:
        return self.steps[-1].value


def _divisor_multiple(rng: random.Random, lo: int, hi: int, divisors: range) -> tuple[int, int]:
    """A divisor d from `divisors` and a multiple of d in [lo, hi]."""
    while True:
        d = rng.choice(list(divisors))
        multiples = [m for m in range(lo, hi + 1) if m % d == 0]
        if multiples:
            return d, rng.choice(multiples)


def _shop(rng: random.Random, level: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 12), rng.randint(2, 9)
    total = a * b
    q = f"A pack holds {a} {item}. {name} buys {b} packs."
    steps = [Step(f"{b} packs of {a} {item}", f"{b} * {a}", total)]
    if level >= 2:
        if level >= 3:
            d, rest = _divisor_multiple(rng, 1, total - 1, range(2, 6))
            c = total - rest
        else:
            c = rng.randint(1, total - 1)
            rest = total - c
        q += f" {name} gives {c} {item} to a neighbour."
        steps.append(Step(f"{item} left after giving {c} away", f"{total} - {c}", rest))
        if level >= 3:
            q += f" {name} shares the rest equally among {d} friends. How many {item} does each friend get?"
            steps.append(Step("each friend's share", f"{rest} / {d}", rest // d))
        else:
            q += f" How many {item} does {name} have left?"
    else:
        q += f" How many {item} does {name} have?"
    return Problem("shop", level, q, tuple(steps))


def _savings(rng: random.Random, level: int) -> Problem:
    name = rng.choice(NAMES)
    a, b = rng.randint(2, 15), rng.randint(2, 10)
    total = a * b
    q = f"{name} saves {a} dollars every week for {b} weeks."
    steps = [Step(f"savings after {b} weeks", f"{a} * {b}", total)]
    if level >= 2:
        c = rng.randint(1, total - 1)
        rest = total - c
        q += f" Then {name} spends {c} dollars on a book."
        steps.append(Step("money left after the book", f"{total} - {c}", rest))
        if level >= 3:
            d = rng.randint(2, 4)
            q += f" A grandparent then gives {name} {d} times what is left. How many dollars does {name} get from the grandparent?"
            steps.append(Step("the grandparent's gift", f"{rest} * {d}", rest * d))
        else:
            q += f" How many dollars does {name} have now?"
    else:
        q += f" How many dollars does {name} save in total?"
    return Problem("savings", level, q, tuple(steps))


def _travel(rng: random.Random, level: int) -> Problem:
    a, b = rng.randint(20, 90), rng.randint(2, 6)
    dist = a * b
    q = f"A train travels at {a} km per hour for {b} hours."
    steps = [Step(f"distance in {b} hours", f"{a} * {b}", dist)]
    if level >= 2:
        c = rng.randint(5, 60)
        q += f" Then it travels {c} more km to the last station."
        steps.append(Step("length of the whole trip", f"{dist} + {c}", dist + c))
        dist += c
        if level >= 3:
            d = rng.randint(2, 5)
            q += f" It makes the same trip on {d} days. How many km does it travel over those days?"
            steps.append(Step(f"distance over {d} days", f"{dist} * {d}", dist * d))
        else:
            q += " How long is the whole trip in km?"
    else:
        q += " How many km does it travel?"
    return Problem("travel", level, q, tuple(steps))


def _garden(rng: random.Random, level: int) -> Problem:
    a, b = rng.randint(3, 12), rng.randint(3, 12)
    total = a * b
    q = f"A garden has {a} rows with {b} plants in each row."
    steps = [Step("plants in the garden", f"{a} * {b}", total)]
    if level >= 2:
        if level >= 3:
            d, rest = _divisor_multiple(rng, max(1, total // 2), total - 1, range(2, 7))
            c = total - rest
        else:
            c = rng.randint(1, total - 1)
            rest = total - c
        q += f" {c} plants dry out and are removed."
        steps.append(Step("plants that remain", f"{total} - {c}", rest))
        if level >= 3:
            q += f" The remaining plants are moved into {d} beds with the same number in each. How many plants are in each bed?"
            steps.append(Step("plants per bed", f"{rest} / {d}", rest // d))
        else:
            q += " How many plants remain?"
    else:
        q += " How many plants are in the garden?"
    return Problem("garden", level, q, tuple(steps))


def _marbles(rng: random.Random, level: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    q = f"{name} has {a} {item} and finds {b} more."
    steps = [Step(f"{item} after finding more", f"{a} + {b}", a + b)]
    total = a + b
    if level >= 2:
        c = rng.randint(1, total - 1)
        q += f" Later {name} loses {c} of them."
        steps.append(Step(f"{item} after losing some", f"{total} - {c}", total - c))
        total -= c
        if level >= 3:
            d = rng.randint(2, 30)
            q += f" A friend gives {name} {d} {item}. How many {item} does {name} have at the end?"
            steps.append(Step(f"{item} at the end", f"{total} + {d}", total + d))
        else:
            q += f" How many {item} does {name} have now?"
    else:
        q += f" How many {item} does {name} have?"
    return Problem("marbles", level, q, tuple(steps))


TEMPLATES: dict[str, Callable[[random.Random, int], Problem]] = {
    "shop": _shop,
    "savings": _savings,
    "travel": _travel,
    "garden": _garden,
    "marbles": _marbles,
}
LEVELS = (1, 2, 3)


def problems(seed: int, exclude: set[str] | None = None) -> Iterator[Problem]:
    """An endless stream of distinct problems, cycling templates and levels, for a given seed.

    Questions in `exclude` (and questions already yielded) are skipped, so sets drawn from one
    stream never overlap.
    """
    rng = random.Random(seed)
    seen = set(exclude or ())
    while True:
        for template in TEMPLATES.values():
            for level in LEVELS:
                p = template(rng, level)
                if p.question not in seen:
                    seen.add(p.question)
                    yield p


def _wrong_steps(rng: random.Random, steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """The same steps with an arithmetic slip in one of them, carried through to the answer."""
    k = rng.randrange(len(steps))
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    out = _slip(steps, k, delta)
    if out[-1].value == steps[-1].value:  # the slip vanished (integer division): slip the last step
        out = _slip(steps, len(steps) - 1, delta)
    return out


def _slip(steps: tuple[Step, ...], k: int, delta: int) -> tuple[Step, ...]:
    """Recompute `steps` with `delta` added to step k's result; later steps use the wrong value."""
    out, carry = [], None
    for i, s in enumerate(steps):
        left, op, right = s.expr.split(" ")
        a, b = (carry if carry is not None else int(left)), int(right)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] + (delta if i == k else 0)
        out.append(Step(s.what, f"{a} {op} {b}", value))
        carry = value
    return tuple(out)


def solution(p: Problem, style: str = "canonical", rng: random.Random | None = None) -> str:
    """The worked solution of `p` in one of the pool styles (see POOL_TYPES)."""
    if style == "canonical":
        lines = [f"Step {i}: {s.what}: {s.expr} = {s.value}." for i, s in enumerate(p.steps, 1)]
        return "<think>\n" + "\n".join(lines) + f"\n</think>\nThe answer is \\boxed{{{p.answer}}}."
    if style == "paraphrase":
        words = ["First", "Next", "Then", "Finally"]
        lines = [
            f"{words[min(i, 2) if i < len(p.steps) - 1 else 3]}, {s.expr} gives {s.value}, the {s.what}."
            for i, s in enumerate(p.steps)
        ]
        if len(p.steps) == 1:
            lines = [f"We compute {p.steps[0].expr} = {p.steps[0].value}, the {p.steps[0].what}."]
        return (
            "<think>\n"
            + "\n".join(lines)
            + f"\n</think>\nSo the final answer is \\boxed{{{p.answer}}}."
        )
    if style == "terse":
        return f"<think>\n</think>\nThe answer is \\boxed{{{p.answer}}}."
    if style == "wrong":
        steps = _wrong_steps(rng or random.Random(0), p.steps)
        lines = [f"Step {i}: {s.what}: {s.expr} = {s.value}." for i, s in enumerate(steps, 1)]
        return (
            "<think>\n"
            + "\n".join(lines)
            + f"\n</think>\nThe answer is \\boxed{{{steps[-1].value}}}."
        )
    raise ValueError(f"unknown solution style {style!r}; expected one of {POOL_TYPES}")


CONTROL_TEMPLATES = [
    ("Repeat this word: {word}.", "{word}"),
    ("Say hello to {name}.", "Hello, {name}!"),
    ("What is the name in this sentence: {name} has a {color} bag.", "{name}"),
    ("What color is the bag in this sentence: {name} has a {color} bag.", "{color}"),
    ("Write the word {word} in capital letters.", "{upper}"),
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
WORDS = ["apple", "river", "window", "garden", "pencil", "cloud", "train", "basket"]


def control_prompts(seed: int, n: int) -> list[dict]:
    """`n` distinct prompts that need no reasoning, with their exact answers."""
    rng = random.Random(seed + 7919)
    rows, seen = [], set()
    while len(rows) < n:
        q, a = rng.choice(CONTROL_TEMPLATES)
        word, name, color = rng.choice(WORDS), rng.choice(NAMES), rng.choice(COLORS)
        fields = {"word": word, "name": name, "color": color, "upper": word.upper()}
        query = q.format(**fields)
        if query in seen:
            if len(seen) >= len(CONTROL_TEMPLATES) * len(WORDS) * len(NAMES):
                raise ValueError(f"cannot make {n} distinct control prompts")
            continue
        seen.add(query)
        rows.append({"query": query, "answer": a.format(**fields)})
    return rows


def chatml(system: str | None, user: str, assistant: str | None = None) -> str:
    """A conversation rendered in the ChatML format the demo tokenizer's chat template produces."""
    out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    out += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if assistant is not None:
        out += f"{assistant}<|im_end|>\n"
    return out


@dataclass(frozen=True)
class DemoSizes:
    """How many rows each demo set gets."""

    pool_per_type: int = 40
    eval: int = 60
    control: int = 30
    pretrain: int = 3000


def build_demo_data(seed: int, sizes: DemoSizes) -> dict[str, list[dict]]:
    """All demo sets as lists of records: pool (alpaca + type), eval (MATH), control (queries), pretrain (text)."""
    rng = random.Random(seed)
    eval_stream = problems(seed + 1)
    eval_problems = [next(eval_stream) for _ in range(sizes.eval)]
    held_out = {p.question for p in eval_problems}
    train_stream = problems(seed + 2, exclude=held_out)

    eval_rows = [
        {
            "problem": p.question,
            "solution": solution(p),
            "answer": str(p.answer),
            "level": f"Level {p.level}",
            "type": p.template,
        }
        for p in eval_problems
    ]
    pool_rows = []
    for style in POOL_TYPES:
        for _ in range(sizes.pool_per_type):
            p = next(train_stream)
            pool_rows.append(
                {
                    "instruction": INSTRUCTION,
                    "input": p.question,
                    "output": solution(p, style, rng),
                    "type": style,
                    "answer": str(p.answer),
                }
            )
    control = control_prompts(seed, sizes.control)
    pretrain = []
    for _ in range(sizes.pretrain):
        p = next(train_stream)
        pretrain.append({"text": chatml(None, f"{INSTRUCTION}\n{p.question}", solution(p))})
    for row in control:
        pretrain.append({"text": chatml(None, row["query"], row["answer"])})
    rng.shuffle(pretrain)
    return {"pool": pool_rows, "eval": eval_rows, "control": control, "pretrain": pretrain}


def write_demo_data(out: dict[str, Path], seed: int, sizes: DemoSizes) -> dict[str, int]:
    """Write the demo sets: pool as a JSON array (alpaca), the others as JSONL. Returns row counts."""
    data = build_demo_data(seed, sizes)
    for key, path in out.items():
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = data[key]
        with path.open("w") as f:
            if path.suffix == ".json":
                json.dump(rows, f, indent=1, ensure_ascii=False)
                f.write("\n")
            else:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {k: len(data[k]) for k in out}


def corpus_texts(data: dict[str, list[dict]]) -> Iterator[str]:
    """Every text of the demo sets, for training the demo tokenizer."""
    for row in data["pretrain"]:
        yield row["text"]
    for row in data["pool"]:
        yield chatml(None, f"{row['instruction']}\n{row['input']}", row["output"])
    for row in data["control"]:
        yield chatml(None, row["query"], row["answer"])


def read_demo_files(paths: dict[str, str | Path]) -> dict[str, list[dict]]:
    """Read demo sets written by `write_demo_data` back (JSON array or JSONL by suffix)."""
    data = {}
    for key, path in paths.items():
        path = Path(path)
        with path.open() as f:
            data[key] = json.load(f) if path.suffix == ".json" else [json.loads(line) for line in f]
    return data
