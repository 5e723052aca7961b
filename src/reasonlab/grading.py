"""Reasoning and answer extraction from completions, answer grading, and accuracy intervals.

- `extract_reasoning`: the `<think>…</think>` block, or the text between configurable start/end
  markers (seed 000's "Let me think step by step." / "Therefore, the answer is"), else the whole text;
  returns (reasoning, the rest).
- `extract_answer`: the last `\\boxed{…}` (nested braces), GSM8K's `#### n`, "the answer is …", or
  the last number — in that order, or only the ones a dataset format asks for.
- `grade`: GSM8K-style numeric comparison (commas, `$`, units, a trailing `.`), or MATH-style
  equivalence with the `math-verify` library under a time limit; an answer that cannot be parsed
  is graded false and flagged, never an exception.
- `wilson`: the 95 % Wilson score interval of an accuracy.
"""

from __future__ import annotations

import math
import re

from reasonlab.answers import gsm8k_final, last_boxed

THINK = re.compile(r"<think>(.*?)(?:</think>|$)(.*)", re.S)
ANSWER_IS = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:)\s*(.+?)(?:\.\s|\.?$|\n)", re.I | re.S
)
NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?")
STRATEGIES = ("boxed", "gsm8k", "answer_is", "last_number")


def extract_reasoning(
    text: str, start: str | None = None, end: str | None = None
) -> tuple[str, str]:
    """(reasoning, rest) of a completion: a `<think>` block, else the text between `start` and
    `end` markers, else (the whole text, the whole text)."""
    m = THINK.search(text)
    if m:
        return m.group(1).strip(), m.group(2).strip()
    if start and start in text:
        after = text.split(start, 1)[1]
        if end and end in after:
            reasoning, rest = after.split(end, 1)
            return reasoning.strip(), (end + rest).strip()
        return after.strip(), after.strip()
    if end and end in text:
        reasoning, rest = text.split(end, 1)
        return reasoning.strip(), (end + rest).strip()
    return text.strip(), text.strip()


def extract_answer(
    text: str, strategies: tuple[str, ...] = STRATEGIES
) -> tuple[str | None, str | None]:
    """(answer, the strategy that found it) from a completion (or its part after the reasoning)."""
    for s in strategies:
        if s == "boxed":
            found = last_boxed(text)
        elif s == "gsm8k":
            found = gsm8k_final(text)
        elif s == "answer_is":
            hits = ANSWER_IS.findall(text)
            found = hits[-1].strip().rstrip(".") if hits else None
        elif s == "last_number":
            hits = NUMBER.findall(text)
            found = hits[-1] if hits else None
        else:
            raise ValueError(f"unknown answer strategy {s!r}; expected one of {STRATEGIES}")
        if found:
            return found.strip(), s
    return None, None


UNIT_TAIL = re.compile(r"^(-?\d+(?:\.\d+)?)\s*[A-Za-z%°/ ]*$")


def normalize_number(s: str | None) -> str | None:
    """A numeric answer in canonical form ('1,200 $' -> '1200', '3.50' -> '3.5', '7 apples.' -> '7');
    None if it is not a number."""
    if s is None:
        return None
    t = s.strip().replace("\\$", "").replace("$", "").replace(",", "").replace("\\%", "%").strip()
    t = re.sub(r"\\(?:text|mathrm)\{([^}]*)\}", r"\1", t).rstrip(".").strip()
    m = UNIT_TAIL.match(t)
    if not m:
        return None
    value = float(m.group(1))
    return str(int(value)) if value == int(value) else repr(value).rstrip("0").rstrip(".")


def _math_text(s: str) -> str:
    s = s.strip().replace("\\$", "").replace("\\!", "")
    return s if s.startswith("$") or s.startswith("\\boxed") else f"${s}$"


def grade(
    answer: str | None, reference: str | None, mode: str = "numeric", timeout: int = 5
) -> tuple[bool, str | None]:
    """(correct, flag): flag says why an answer could not be judged ('no answer', 'unparseable
    answer', 'no reference', 'timeout'); such answers are graded False."""
    if reference is None or not str(reference).strip():
        return False, "no reference"
    if answer is None or not answer.strip():
        return False, "no answer"
    if mode == "numeric":
        a, r = normalize_number(answer), normalize_number(reference)
        if a is not None and r is not None:
            return a == r, None
        if a is None and r is not None:
            return False, "unparseable answer"
        return answer.strip() == str(reference).strip(), None
    if mode != "math":
        raise ValueError(f"grading mode must be 'numeric' or 'math', not {mode!r}")
    from math_verify import parse, verify

    try:
        gold = parse(_math_text(str(reference)), parsing_timeout=timeout)
        pred = parse(_math_text(answer), parsing_timeout=timeout)
        if not pred:
            return False, "unparseable answer"
        if not gold:
            return False, "unparseable reference"
        correct = bool(verify(gold, pred, timeout_seconds=timeout))
        if all(
            isinstance(x, str) for x in pred
        ):  # no expression could be read: text comparison only
            return correct, "unparsed answer (compared as text)"
        return correct, None
    except TimeoutError:
        return False, "timeout"
    except Exception as e:  # math-verify raises many kinds on odd input; grade false, say why
        return False, f"unparseable answer ({type(e).__name__})"


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) for k successes out of n; (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# How each dataset format's answers are found and compared.
FORMAT_RULES = {
    "gsm8k": (("gsm8k", "boxed", "answer_is", "last_number"), "numeric"),
    "math": (("boxed", "answer_is", "last_number"), "math"),
}
DEFAULT_RULES = (STRATEGIES, "math")


def grade_table(raw, data, fmt: str, start: str | None = None, end: str | None = None):
    """Generations (raw) joined with their dataset rows' references, with reasoning, answer, how it
    was found, correct, a flag for answers that could not be judged, and the row's difficulty
    `level` and sample `type` (null where the dataset has none)."""
    import polars as pl

    strategies, mode = FORMAT_RULES.get(fmt, DEFAULT_RULES)
    refs = dict(zip(data["id"], data["reference"], strict=True))
    meta = {c: dict(zip(data["id"], data[c], strict=True)) if c in data.columns else {}
            for c in CARRIED}  # fmt: skip
    rows = []
    for r in raw.select("id", "completion").iter_rows(named=True):
        reasoning, rest = extract_reasoning(r["completion"], start, end)
        answer, how = extract_answer(rest, strategies)
        if answer is None and rest != r["completion"]:
            answer, how = extract_answer(r["completion"], strategies)
        correct, flag = grade(answer, refs.get(r["id"]), mode)
        rows.append({"reasoning": reasoning, "answer": answer, "answer_strategy": how,
                     "reference": refs.get(r["id"]), "correct": correct, "grade_flag": flag}
                    | {c: _text(meta[c].get(r["id"])) for c in CARRIED})  # fmt: skip
    extra = pl.DataFrame(rows, schema={"reasoning": pl.String, "answer": pl.String, "answer_strategy": pl.String,
                                       "reference": pl.String, "correct": pl.Boolean, "grade_flag": pl.String}
                         | {c: pl.String for c in CARRIED})  # fmt: skip
    return pl.concat([raw, extra], how="horizontal")


CARRIED = ("level", "type")  # dataset columns a graded table carries over, for accuracy by level


def _text(v) -> str | None:
    return None if v is None else str(v)


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """McNemar's exact test of paired outcomes (the same problems under two systems): the
    discordant counts (a right and b wrong, the reverse) and the two-sided binomial p-value."""
    from scipy.stats import binomtest

    if len(a) != len(b):
        raise ValueError(f"paired outcomes of different lengths ({len(a)} vs {len(b)})")
    only_a = sum(bool(x) and not bool(y) for x, y in zip(a, b, strict=True))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(a, b, strict=True))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)
    return {"n": len(a), "only_a": only_a, "only_b": only_b, "p_value": p}
