"""Reasoning and answer extraction and grading on GSM8K- and MATH-style fixtures."""

import math

import polars as pl
import pytest
from scipy.stats import binomtest

from reasonlab.grading import (
    extract_answer,
    extract_reasoning,
    grade,
    grade_table,
    normalize_number,
    wilson,
)


def test_reasoning_from_think_block_markers_or_whole_text():
    assert extract_reasoning("<think>\n2 + 3 = 5\n</think>\nThe answer is \\boxed{5}.") == (
        "2 + 3 = 5",
        "The answer is \\boxed{5}.",
    )
    assert extract_reasoning("<think>unfinished thought") == ("unfinished thought", "")
    text = "Q?\nLet me think step by step. 6 * 7 = 42. Therefore, the answer is 42."
    reasoning, rest = extract_reasoning(
        text, "Let me think step by step.", "Therefore, the answer is"
    )
    assert reasoning == "6 * 7 = 42." and rest == "Therefore, the answer is 42."
    assert extract_reasoning("just 42") == ("just 42", "just 42")


@pytest.mark.parametrize(
    ("text", "answer", "how"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", "boxed"),
        (
            "first \\boxed{1}, then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
            "boxed",
        ),
        ("She pays 3 * 4 = 12 dollars.\n#### 1,200", "1200", "gsm8k"),
        ("Thus the answer is 72 apples. Done", "72 apples", "answer_is"),
        ("Answer: 10\\%", "10\\%", "answer_is"),
        ("3 + 4 = 7, then 7 * 2 = 14", "14", "last_number"),
        ("no digits here", None, None),
    ],
)
def test_answer_extraction(text, answer, how):
    assert extract_answer(text) == (answer, how)


def test_strategies_can_be_restricted():
    assert extract_answer("The answer is 5. \\boxed{6}", ("answer_is",)) == ("5", "answer_is")
    with pytest.raises(ValueError, match="unknown answer strategy"):
        extract_answer("x", ("guess",))


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("1,200", "1200"),
        ("$18", "18"),
        ("\\$10", "10"),
        ("18.00", "18"),
        ("3.50", "3.5"),
        ("7 apples.", "7"),
        ("-4", "-4"),
        ("\\text{5 cm}", "5"),
        ("ten", None),
        ("1/2", None),
    ],  # fmt: skip
)
def test_numeric_normalization(raw, norm):
    assert normalize_number(raw) == norm


@pytest.mark.parametrize(
    ("answer", "reference", "correct"),
    [
        ("1,200", "1200", True),
        ("$18.00", "18", True),
        ("72 apples", "72", True),
        ("\\$10", "10", True),
        ("71", "72", False),
        ("-72", "72", False),
    ],  # fmt: skip
)
def test_gsm8k_grading(answer, reference, correct):
    assert grade(answer, reference, "numeric") == (correct, None)


@pytest.mark.parametrize(
    ("answer", "reference", "correct"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac12", "\\frac{1}{2}", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
        ("10\\%", "10", True),
        ("\\$10", "10", True),
        ("\\frac{1}{3}", "0.5", False),
        ("(3, \\pi)", "(3, \\frac{\\pi}{2})", False),
        ("4", "3", False),
    ],
)
def test_math_grading_with_math_verify(answer, reference, correct):
    assert grade(answer, reference, "math") == (correct, None)


def test_unjudgeable_answers_are_false_and_flagged():
    assert grade(None, "5", "math") == (False, "no answer")
    assert grade("5", None, "numeric") == (False, "no reference")
    assert grade("seven", "7", "numeric") == (False, "unparseable answer")
    assert grade("\\frac{", "5", "math") == (False, "unparsed answer (compared as text)")
    assert grade("", "5", "math") == (False, "no answer")


def test_wilson_interval():
    lo, hi = wilson(45, 100)
    ci = binomtest(45, 100).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_graded_table_carries_level_and_type():
    raw = pl.DataFrame({"id": ["a", "b", "a"], "sample": [0, 0, 1],
                        "completion": ["\\boxed{5}", "\\boxed{2}", "\\boxed{4}"]})  # fmt: skip
    data = pl.DataFrame({"id": ["a", "b"], "reference": ["5", "3"], "level": ["Level 3", None],
                         "type": ["algebra", "geometry"]})  # fmt: skip
    g = grade_table(raw, data, "math")
    assert g["correct"].to_list() == [True, False, False]
    assert g["level"].to_list() == ["Level 3", None, "Level 3"]  # each completion its row's
    assert g["type"].to_list() == ["algebra", "geometry", "algebra"]
    # a dataset without levels or types: both columns null, the grading unchanged
    plain = grade_table(raw, data.select("id", "reference"), "math")
    assert plain["level"].dtype == pl.String and plain["level"].null_count() == 3
    assert plain["type"].null_count() == 3 and plain["correct"].to_list() == g["correct"].to_list()
