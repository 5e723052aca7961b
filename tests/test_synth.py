"""The demo's synthetic data generator."""

import itertools
import re

import pytest

from reasonlab import synth
from reasonlab.answers import last_boxed

SMALL = synth.DemoSizes(pool_per_type=12, eval=30, control=20, pretrain=60, traces=40, pairs=10)
STEP = re.compile(r"^Step \d+: .*: (\d+) ([-+*/]) (\d+) = (-?\d+)\.$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
WORD_VALUES = {
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
}
USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


def check_arithmetic(solution: str) -> int:
    """Recompute every step of a canonical solution independently; return the last value."""
    think = solution.split("<think>\n", 1)[1].split("\n</think>", 1)[0]
    value = None
    for line in think.splitlines():
        a, op, b, v = STEP.match(line).groups()
        a, b, v = int(a), int(b), int(v)
        if value is not None:
            assert a == value, f"step does not continue from the previous result: {line}"
        if op == "/":
            assert a % b == 0, f"inexact division: {line}"
            assert v == a // b
        else:
            assert v == OPS[op](a, b), line
        value = v
    return value


def solve(question: str) -> tuple[int, int, tuple[int, int]]:
    """(answer, level, first-step operands) of a demo question, read from its words alone.

    The design's promise: one numeral and one number word; "finds ... more" adds them, otherwise
    they multiply; "keeps half/a third of" splits; "doubles", "triples", "a dozen more" grow.
    """
    numerals = re.findall(r"\b\d+\b", question)
    words = [w for w in re.findall(r"[a-z]+", question) if w in WORD_VALUES]
    assert len(numerals) == 1 and len(words) == 1, question
    a, b = int(numerals[0]), WORD_VALUES[words[0]]
    value, level = (a + b if " finds " in question else a * b), 1
    split = re.search(r" keeps (half|a third) of ", question)
    if split:
        k = 2 if split.group(1) == "half" else 3
        assert value % k == 0, question
        value, level = value // k, 2
    growths = [g for g in ("doubles", "triples", "a dozen more") if g in question]
    if growths:
        assert split and len(growths) == 1, question
        value = {"doubles": value * 2, "triples": value * 3, "a dozen more": value + 12}[growths[0]]
        level = 3
    return value, level, (a, b)


def test_same_seed_same_data_other_seed_other_data():
    a, b = synth.build_demo_data(3, SMALL), synth.build_demo_data(3, SMALL)
    c = synth.build_demo_data(4, SMALL)
    assert a == b
    assert a["eval"] != c["eval"] and a["pool"] != c["pool"]


def test_sizes_and_pool_types():
    d = synth.build_demo_data(0, SMALL)
    assert len(d["eval"]) == 30 and len(d["control"]) == 20
    assert len(d["pretrain"]) == 60 + 20  # problems plus the control answers
    types = [r["type"] for r in d["pool"]]
    assert {t: types.count(t) for t in set(types)} == dict.fromkeys(synth.POOL_TYPES, 12)


def test_eval_solutions_are_correct_and_levels_match_steps():
    d = synth.build_demo_data(0, SMALL)
    levels, templates = set(), set()
    for row in d["eval"]:
        value = check_arithmetic(row["solution"])
        assert str(value) == row["answer"] == last_boxed(row["solution"])
        n_steps = row["solution"].count("\nStep ")
        assert row["level"] == f"Level {n_steps}"
        assert int(row["answer"]) >= 0
        levels.add(row["level"])
        templates.add(row["type"])
    assert levels == {"Level 1", "Level 2", "Level 3"}
    assert templates == set(synth.TEMPLATES)


def test_answers_follow_from_the_question_words_alone():
    d = synth.build_demo_data(0, SMALL)
    rows = [(r["problem"], r["answer"], r["level"], r["solution"]) for r in d["eval"]]
    rows += [(r["input"], r["answer"], None, r["output"]) for r in d["pool"]]
    for text in (r["text"] for r in d["pretrain"] if "<think>" in r["text"]):
        question = USER.search(text).group(1).removeprefix(synth.INSTRUCTION + "\n")
        rows.append((question, last_boxed(text), None, text))
    for question, answer, level, sol in rows:
        value, n_steps, operands = solve(question)
        assert str(value) == answer, question
        if level is not None:
            assert level == f"Level {n_steps}"
        first = re.search(r"^Step 1: .*$", sol, re.M)  # canonical or wrong (the slip keeps them)
        if first:
            a, _, b, _ = STEP.match(first.group()).groups()
            assert sorted((int(a), int(b))) == sorted(operands), (question, sol)


def test_default_demo_sizes_levels_and_prompt_forms():
    d = synth.build_demo_data(0, synth.DemoSizes())
    levels = [r["level"] for r in d["eval"]]
    assert len(levels) >= 150
    assert all(levels.count(f"Level {k}") >= 45 for k in (1, 2, 3))
    # levels 2-3 keep at least two arithmetic steps
    assert all(r["solution"].count("\nStep ") >= 2 for r in d["eval"] if r["level"] != "Level 1")
    problems = [r["text"] for r in d["pretrain"] if "<think>" in r["text"]]
    with_instruction = [t for t in problems if synth.INSTRUCTION in t]
    assert len(problems) == 3000 and len(with_instruction) == 1500
    # the other half asks as the eval set does: the chat prompt of the question alone
    eval_like = synth.chatml(None, d["eval"][0]["problem"]).split("\n", 1)[0]
    assert all(t.startswith(eval_like) for t in problems)


def test_pool_styles():
    d = synth.build_demo_data(0, SMALL)
    for row in d["pool"]:
        boxed = last_boxed(row["output"])
        if row["type"] == "canonical":
            assert str(check_arithmetic(row["output"])) == boxed == row["answer"]
        elif row["type"] in ("paraphrase", "terse"):
            assert boxed == row["answer"]
        elif row["type"] == "wrong":
            assert boxed != row["answer"]  # a slip in one step carried to the end
        assert row["output"].startswith("<think>\n") and "\n</think>\n" in row["output"]


def test_held_out_eval_never_in_training_texts():
    d = synth.build_demo_data(0, SMALL)
    train_text = "\n".join(r["text"] for r in d["pretrain"]) + "\n".join(
        r["input"] for r in d["pool"]
    )
    for row in d["eval"]:
        assert row["problem"] not in train_text


def test_control_prompts_distinct_with_answers():
    rows = synth.control_prompts(0, 40)
    assert len({r["query"] for r in rows}) == 40
    for r in rows:
        if r["query"].startswith("Repeat this word: "):
            assert r["answer"] == r["query"].removeprefix("Repeat this word: ").rstrip(".")


def test_unknown_style_is_an_error():
    p = next(synth.problems(0))
    with pytest.raises(ValueError, match="unknown solution style"):
        synth.solution(p, "poetic")


def test_write_and_read_back(tmp_path):
    paths = {
        k: tmp_path / f"{k}.{'json' if k == 'pool' else 'jsonl'}"
        for k in ("pool", "eval", "control", "pretrain", "traces", "pairs")
    }
    counts = synth.write_demo_data(paths, 0, SMALL)
    assert counts == {"pool": 48, "eval": 30, "control": 20, "pretrain": 80, "traces": 40,
                      "pairs": 20}  # fmt: skip
    assert synth.read_demo_files(paths) == synth.build_demo_data(0, SMALL)


def test_traces_are_balanced_unseen_and_differ_only_in_the_arithmetic():
    d = synth.build_demo_data(0, SMALL)
    rows = d["traces"]
    assert (
        [r["type"] for r in rows].count("correct") == [r["type"] for r in rows].count("wrong") == 20
    )
    seen = {r["problem"] for r in d["eval"]} | {r["input"] for r in d["pool"]}
    pretrain = "\n".join(r["text"] for r in d["pretrain"])
    assert len({r["input"] for r in rows}) == len(rows)
    for r in rows:
        assert r["input"] not in seen and r["input"] not in pretrain
        boxed = last_boxed(r["output"])
        if r["type"] == "correct":
            assert str(check_arithmetic(r["output"])) == boxed == r["answer"]
        else:
            assert boxed != r["answer"]  # the slip is carried to the answer
            with pytest.raises(AssertionError):
                check_arithmetic(r["output"])
        # the same wording as a correct solution: only numbers differ
        assert re.sub(r"\d+", "N", r["output"]) == re.sub(
            r"\d+", "N", synth.solution(_problem(r), "canonical")
        )
    assert {r["level"] for r in rows} == {"Level 1", "Level 2", "Level 3"}


def test_traces_leave_the_other_sets_unchanged():
    # (the pairs are drawn after the traces and avoid their problems: they may change)
    a = synth.build_demo_data(0, SMALL)
    b = synth.build_demo_data(0, synth.DemoSizes(**{**SMALL.__dict__, "traces": 2}))
    assert {k: v for k, v in a.items() if k not in ("traces", "pairs")} == {
        k: v for k, v in b.items() if k not in ("traces", "pairs")
    }


def test_pairs_differ_in_one_number_are_unseen_and_leave_the_other_sets_unchanged():
    d = synth.build_demo_data(0, SMALL)
    rows = d["pairs"]
    assert len(rows) == 2 * SMALL.pairs
    seen = {r["problem"] for r in d["eval"]} | {r["input"] for r in d["pool"] + d["traces"]}
    pretrain = "\n".join(r["text"] for r in d["pretrain"])
    for clean, bad in zip(rows[::2], rows[1::2], strict=True):
        assert (clean["role"], bad["role"]) == ("clean", "corrupted") and clean["pair"] == bad[
            "pair"
        ]
        assert clean["problem"] not in seen and clean["problem"] not in pretrain
        a, b = re.findall(r"\d+", clean["problem"]), re.findall(r"\d+", bad["problem"])
        assert len(a) == len(b) == 1 and a != b  # one numeral, changed
        assert re.sub(r"\d+", "N", clean["problem"]) == re.sub(r"\d+", "N", bad["problem"])
        assert clean["answer"] != bad["answer"]
        for r in (clean, bad):  # each side's solution is right, and the two align character-wise
            assert str(check_arithmetic(r["solution"])) == last_boxed(r["solution"]) == r["answer"]
        assert len(clean["solution"]) == len(bad["solution"])
        assert re.sub(r"\d", "N", clean["solution"]) == re.sub(r"\d", "N", bad["solution"])
    other = synth.build_demo_data(0, synth.DemoSizes(**{**SMALL.__dict__, "pairs": 3}))
    assert {k: v for k, v in d.items() if k != "pairs"} == {
        k: v for k, v in other.items() if k != "pairs"
    }


def _problem(row):
    """The Problem of a trace row, found again in the seeded stream by its question."""
    for p in itertools.islice(synth.problems(3), 20000):
        if p.question == row["input"]:
            return p
    raise AssertionError(f"no problem {row['input']!r} in the stream")
