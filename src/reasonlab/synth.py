"""Seeded synthetic reasoning data for the embedded demo.

Arithmetic word problems from several story templates at difficulty levels 1–3 (the number of
arithmetic steps), each with a step-by-step solution in ``<think>…</think>`` followed by
``\\boxed{answer}`` and a known integer answer. From them: a training pool whose rows carry a sample
``type`` (seed 003's pool), an evaluation set in MATH format, control prompts that need no reasoning
(seed 001's contrasts) and a pre-training corpus. Everything is a pure function of the seed.

The problems are built so that a ~1M-parameter model learns them in about two CPU minutes of
pre-training: small numbers (a numeral 2–9 times a number word two–five, or plus two–nine; then
keep half or a third; then double, triple or add a dozen), one short line per step, and operands
that a small model finds by what they are rather than where they are — each question has one
numeral, one number word, at level 2+ one split word (``half``, ``a third``) and at level 3 one
growth word (``doubles``, ``triples``, ``a dozen more``). Earlier templates, whose steps took up to
three numerals from the question by position and did two-digit arithmetic, stayed at 5–19 %
accuracy within the same budget. Half of the pre-training texts carry the pool's instruction, the
other half ask the question alone, as the evaluation set does.
"""

from __future__ import annotations

import json
import random
import re
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
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}  # fmt: skip
SPLITS = {2: "half", 3: "a third"}  # level 2: keep 1/k of the total
GROWTHS = (
    ("doubles them", "*", 2),
    ("triples them", "*", 3),
    ("gets a dozen more", "+", 12),
)  # level 3


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


def _first(rng: random.Random, level: int, add: bool = False) -> tuple[int, int, int, int | None]:
    """(numeral, number word's value, their product or sum, the split k) for a problem's first step.

    From level 2 the total must split evenly: k (2 or 3) divides it.
    """
    while True:
        digit, word = rng.randint(2, 9), rng.randint(2, 9 if add else 5)
        total = digit + word if add else digit * word
        ks = [k for k in SPLITS if total % k == 0]
        if level < 2 or ks:
            return digit, word, total, (rng.choice(ks) if ks else None)


def _story(
    rng: random.Random, template: str, level: int, opening: str, first: Step, who: str, ask: str,
    k: int | None,
) -> Problem:  # fmt: skip
    """The opening sentence and first step, then level 2's split and level 3's growth, then the ask."""
    q, steps, value = opening, [first], first.value
    if level >= 2:
        q += f" {who} keeps {SPLITS[k]} of them."
        steps.append(Step("kept", f"{value} / {k}", value // k))
        value //= k
    if level >= 3:
        word, op, n = rng.choice(GROWTHS)
        q += f" Then {who} {word}."
        steps.append(Step("now", f"{value} {op} {n}", value * n if op == "*" else value + n))
    return Problem(template, level, f"{q} {ask}", tuple(steps))


def _shop(rng: random.Random, level: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    d, w, total, k = _first(rng, level)
    opening = f"{name} buys {NUMBER_WORDS[w]} packs of {d} {item}."
    ask = f"How many {item} does {name} have?"
    return _story(rng, "shop", level, opening, Step("bought", f"{w} * {d}", total), name, ask, k)


def _savings(rng: random.Random, level: int) -> Problem:
    name = rng.choice(NAMES)
    d, w, total, k = _first(rng, level)
    opening = f"{name} saves {d} dollars a week for {NUMBER_WORDS[w]} weeks."
    ask = f"How many dollars does {name} have?"
    return _story(rng, "savings", level, opening, Step("saved", f"{d} * {w}", total), name, ask, k)


def _stamps(rng: random.Random, level: int) -> Problem:
    name = rng.choice(NAMES)
    d, w, total, k = _first(rng, level)
    opening = f"{name} has {NUMBER_WORDS[w]} boxes of {d} stamps."
    ask = f"How many stamps does {name} have?"
    return _story(rng, "stamps", level, opening, Step("stamps", f"{w} * {d}", total), name, ask, k)


def _garden(rng: random.Random, level: int) -> Problem:
    d, w, total, k = _first(rng, level)
    opening = f"A garden has {NUMBER_WORDS[w]} rows of {d} plants."
    ask = "How many plants are there?"
    return _story(rng, "garden", level, opening, Step("plants", f"{w} * {d}", total), "The gardener", ask, k)  # fmt: skip


def _marbles(rng: random.Random, level: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    d, w, total, k = _first(rng, level, add=True)
    opening = f"{name} has {d} {item} and finds {NUMBER_WORDS[w]} more."
    ask = f"How many {item} does {name} have?"
    return _story(rng, "marbles", level, opening, Step("found", f"{d} + {w}", total), name, ask, k)


TEMPLATES: dict[str, Callable[[random.Random, int], Problem]] = {
    "shop": _shop,
    "savings": _savings,
    "stamps": _stamps,
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


def corrupt(p: Problem, rng: random.Random) -> Problem | None:
    """`p` with its one numeral changed to another digit, every step recomputed: a different answer
    and every intermediate value of the same number of digits (so that the two texts align token
    by token). None when no digit qualifies (or the numeral also appears as the number word)."""
    numerals = re.findall(r"\b\d+\b", p.question)
    if len(numerals) != 1:
        return None
    d = numerals[0]
    left, op, right = p.steps[0].expr.split(" ")
    if (left == d) == (right == d):  # both operands (or neither) are the numeral: ambiguous
        return None
    for d2 in rng.sample([str(x) for x in range(2, 10)], 8):
        if d2 == d:
            continue
        first = f"{d2} {op} {right}" if left == d else f"{left} {op} {d2}"
        steps, carry = [], None
        for i, s in enumerate(p.steps):
            a, o, b = (first if i == 0 else s.expr).split(" ")
            a = int(a) if carry is None else carry
            if o == "/" and a % int(b):
                break
            carry = {"+": a + int(b), "-": a - int(b), "*": a * int(b), "/": a // int(b)}[o]
            steps.append(Step(s.what, f"{a} {o} {b}", carry))
        else:
            if carry != p.answer and all(
                len(str(x.value)) == len(str(y.value)) and len(x.expr) == len(y.expr)
                for x, y in zip(steps, p.steps, strict=True)
            ):
                q = re.sub(rf"\b{d}\b", d2, p.question)
                return Problem(p.template, p.level, q, tuple(steps))
    return None


def solution(p: Problem, style: str = "canonical", rng: random.Random | None = None) -> str:
    """The worked solution of `p` in one of the pool styles (see POOL_TYPES)."""
    if style == "canonical":
        lines = [f"Step {i}: {s.what}: {s.expr} = {s.value}." for i, s in enumerate(p.steps, 1)]
        return "<think>\n" + "\n".join(lines) + f"\n</think>\nThe answer is \\boxed{{{p.answer}}}."
    if style == "paraphrase":
        words = ["First", "Next", "Then", "Finally"]
        lines = [
            f"{words[min(i, 2) if i < len(p.steps) - 1 else 3]}, {s.expr} gives {s.value} ({s.what})."
            for i, s in enumerate(p.steps)
        ]
        if len(p.steps) == 1:
            lines = [f"We compute {p.steps[0].expr} = {p.steps[0].value} ({p.steps[0].what})."]
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
    eval: int = 150
    control: int = 30
    pretrain: int = 3000
    traces: int = 240  # worked solutions, half correct and half with one arithmetic slip (probes)
    pairs: int = 48  # clean/corrupted problem pairs: one number changed (activation patching)


def build_demo_data(seed: int, sizes: DemoSizes) -> dict[str, list[dict]]:
    """All demo sets as lists of records: pool (alpaca + type), eval (MATH), control (queries),
    pretrain (text), traces (alpaca + type correct/wrong: solutions of problems no other set has,
    alternately right and with one arithmetic slip carried to the answer, lexically alike), pairs
    (MATH + pair and role: clean/corrupted problems differing in one number, for patching)."""
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
    pretrain, seen = [], set(held_out) | {r["input"] for r in pool_rows}
    for i in range(sizes.pretrain):
        p = next(train_stream)
        seen.add(p.question)
        # every other text with the pool's instruction, the rest as the eval set asks (question only)
        user = f"{INSTRUCTION}\n{p.question}" if i % 2 == 0 else p.question
        pretrain.append({"text": chatml(None, user, solution(p))})
    for row in control:
        pretrain.append({"text": chatml(None, row["query"], row["answer"])})
    rng.shuffle(pretrain)
    trace_rng, trace_stream = random.Random(seed + 11), problems(seed + 3, exclude=seen)
    traces = []
    for i in range(sizes.traces):
        p = next(trace_stream)
        style = "wrong" if i % 2 else "canonical"
        traces.append({"instruction": INSTRUCTION, "input": p.question,
                       "output": solution(p, style, trace_rng), "answer": str(p.answer),
                       "type": "wrong" if i % 2 else "correct", "level": f"Level {p.level}"})  # fmt: skip
    seen |= {t["input"] for t in traces}
    pair_rng, pair_stream, pairs = random.Random(seed + 13), problems(seed + 4, exclude=seen), []
    while len(pairs) < 2 * sizes.pairs:
        p = next(pair_stream)
        q = corrupt(p, pair_rng)
        if q is None:
            continue
        n = len(pairs) // 2
        for role, prob in (("clean", p), ("corrupted", q)):
            pairs.append({"id": f"pair-{n}-{role}", "problem": prob.question,
                          "solution": solution(prob), "answer": str(prob.answer),
                          "level": f"Level {prob.level}", "type": prob.template, "pair": n,
                          "role": role})  # fmt: skip
    return {"pool": pool_rows, "eval": eval_rows, "control": control, "pretrain": pretrain,
            "traces": traces, "pairs": pairs}  # fmt: skip


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
