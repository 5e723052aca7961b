"""Reasoning steps of a trace and their uncertainty (the trace explorer's step level).

`split_steps` cuts a text into steps at configurable boundaries: a blank line, a line starting
"Step <n>", a hesitation word ("Wait", "Hmm", …) at the start of a line or a sentence. A text with
no boundary is one step. `token_steps` assigns each token to the step in which it starts (its first
character), from the tokens' own strings. `step_table` joins the scorer's per-token entropy and
varentropy of a scored text set (a checkpoint's own generations, or a dataset's reference
solutions) into one row per step: mean and max entropy and varentropy, the share of "forking"
tokens (entropy above the `quantile` of every token of the text set), the step's opening words,
and — where the dataset carries per-step labels (PRM800K's ratings, `meta.step_ratings`) — the
step's label.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from dataclasses import dataclass, field

from reasonlab import ReasonlabError

log = logging.getLogger(__name__)
TAGS = re.compile(r"</?think>")


class StepError(ReasonlabError):
    """Bad step rules or inputs."""


@dataclass(frozen=True)
class StepRules:
    """Where a step starts: after a blank line, at a line starting "Step <n>", at a hesitation word
    that starts a line or a sentence. `quantile`: the entropy above which a token is "forking"."""

    blank_line: bool = True
    step_n: bool = True
    hesitation: tuple[str, ...] = ("Wait", "Hmm", "Alternatively")
    quantile: float = 0.9
    opening_words: int = 3

    def pattern(self) -> re.Pattern | None:
        parts = []
        if self.blank_line:
            parts.append(r"\n[ \t]*\n\s*(?=\S)")  # the step starts at the next non-blank character
        if self.step_n:
            parts.append(r"(?:^|\n)[ \t]*(?=Step\s+\d+)")
        if self.hesitation:
            words = "|".join(re.escape(w) for w in self.hesitation)
            parts.append(rf"(?:^|\n|(?<=[.!?])[ \t]+)(?=(?:{words})\b)")
        return re.compile("|".join(parts)) if parts else None


def step_starts(text: str, rules: StepRules) -> list[int]:
    """Character offsets where steps start: 0, then every boundary, placed at the start of the
    whitespace before the step's first word (so that a token " Wait" or "\nStep" opens the new
    step); sorted, no duplicates, none at the end of the text."""
    starts = {0}
    pat = rules.pattern()
    if pat is not None:
        for m in pat.finditer(text):
            b = m.end()
            if b >= len(text):
                continue
            while b > 0 and text[b - 1].isspace():
                b -= 1
            starts.add(b)
    out = sorted(starts)
    # a segment of nothing but whitespace and reasoning tags (<think>) joins the step after it
    keep = [out[0]]
    for b in out[1:]:
        if TAGS.sub("", text[keep[-1] : b]).strip():
            keep.append(b)
    return keep


def split_steps(text: str, rules: StepRules) -> list[str]:
    """The steps of `text` (each with its surrounding whitespace stripped; empty ones dropped)."""
    starts = step_starts(text, rules)
    parts = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    return [p.strip() for p in parts if p.strip()]


def token_steps(tokens: list[str], rules: StepRules, starts: list[int] | None = None
                ) -> tuple[list[int], list[str]]:  # fmt: skip
    """(the step index of each token — the step in which its first character lies —, the steps'
    texts) of a text given as its tokens' strings in order; `starts`: the steps' character offsets
    when the data gives them (a labelled dataset's own steps), else found by `rules`."""
    text = "".join(tokens)
    if starts is None or not starts or starts[0] != 0 or starts[-1] >= max(len(text), 1):
        starts = step_starts(text, rules)
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    index = [bisect.bisect_right(starts, o) - 1 for o in offsets]
    texts = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    return index, texts


def opening(text: str, n: int) -> str:
    """The first `n` words of a step (lower-cased, punctuation and digits dropped: "step" rather
    than "Step 3:")."""
    words = re.findall(r"[A-Za-z]+(?:'[a-z]+)?", text)
    return " ".join(w.lower() for w in words[:n])


@dataclass
class Trace:
    """One scored trace: its key in the scorer's table, tags, and its per-step labels if any."""

    score_id: str
    id: str
    sample: int
    correct: bool | None = None
    ratings: list | None = field(default=None)
    starts: list | None = field(default=None)  # the labelled steps' offsets (PRM800K)


def step_table(tokens, traces: list[Trace], rules: StepRules):
    """One row per step of every trace (a polars DataFrame): id, sample, step, n_steps, text,
    opening, n_tokens, entropy_mean/max, varentropy_mean/max, forking_share, correct, rating
    (the dataset's label of that step, where it has one and the step counts agree; else null).
    `tokens`: the scorer's token table (id, position, token, entropy, varentropy, is_prompt) of the
    text set; the completion's tokens only are used."""
    import numpy as np
    import polars as pl

    comp = tokens.filter(~pl.col("is_prompt")).sort("id", "position")
    if not comp.height:
        raise StepError("the scored text set has no completion tokens")
    threshold = float(np.quantile(comp["entropy"].to_numpy(), rules.quantile))
    by_id = {k[0]: g for k, g in comp.group_by("id", maintain_order=True)}
    rows = []
    for t in traces:
        g = by_id.get(t.score_id)
        if g is None:
            continue
        index, texts = token_steps(g["token"].to_list(), rules, t.starts if t.ratings else None)
        ent, var = g["entropy"].to_numpy(), g["varentropy"].to_numpy()
        idx = np.asarray(index)
        kept = [i for i, s in enumerate(texts) if s.strip()]
        ratings = t.ratings if t.ratings is not None and len(t.ratings) == len(kept) else None
        for k, i in enumerate(kept):
            sel = idx == i
            n = int(sel.sum())
            e, v = ent[sel], var[sel]
            rows.append({
                "id": t.id, "sample": t.sample, "step": k, "n_steps": len(kept),
                "text": texts[i].strip(), "opening": opening(texts[i], rules.opening_words),
                "n_tokens": n,
                "entropy_mean": float(e.mean()) if n else None, "entropy_max": float(e.max()) if n else None,
                "varentropy_mean": float(v.mean()) if n else None,
                "varentropy_max": float(v.max()) if n else None,
                "forking_share": float((e > threshold).mean()) if n else None,
                "correct": t.correct, "rating": None if ratings is None else ratings[k],
            })  # fmt: skip
    schema = {"id": pl.String, "sample": pl.Int64, "step": pl.Int64, "n_steps": pl.Int64,
              "text": pl.String, "opening": pl.String, "n_tokens": pl.Int64,
              "entropy_mean": pl.Float64, "entropy_max": pl.Float64, "varentropy_mean": pl.Float64,
              "varentropy_max": pl.Float64, "forking_share": pl.Float64, "correct": pl.Boolean,
              "rating": pl.Int64}  # fmt: skip
    return pl.DataFrame(rows, schema=schema), threshold


def traces_of(sequences, labels) -> list[Trace]:
    """The traces of a scored text set: `sequences` (the scorer's sequence table: id, sample) and
    `labels` (the graded generations or the dataset: id, and `correct` and/or `meta` with
    `step_ratings`)."""
    lab = {r["id"]: r for r in labels.to_dicts()}
    multi = "sample" in sequences.columns and (sequences["sample"].max() or 0) > 0
    out = []
    for r in sequences.select(
        "id", *(["sample"] if "sample" in sequences.columns else [])
    ).to_dicts():
        sample = int(r.get("sample") or 0)
        base = r["id"].rsplit("#", 1)[0] if multi and "#" in r["id"] else r["id"]
        row = lab.get(base, {})
        meta = json.loads(row.get("meta") or "{}") if isinstance(row.get("meta"), str) else {}
        out.append(Trace(r["id"], base, sample, row.get("correct"), meta.get("step_ratings"),
                         meta.get("step_starts")))  # fmt: skip
    return out


def rating_correlation(steps) -> dict | None:
    """Spearman correlations of step entropy (mean, max) and forking share with the steps' ratings,
    and the mean of each statistic per rating; None when no step has a rating."""
    import polars as pl
    from scipy.stats import spearmanr

    rated = steps.filter(pl.col("rating").is_not_null() & pl.col("entropy_mean").is_not_null())
    if rated.height < 3 or rated["rating"].n_unique() < 2:
        return None
    out = {"n_steps": rated.height}
    for col in ("entropy_mean", "entropy_max", "forking_share"):
        rho, p = spearmanr(rated[col].to_numpy(), rated["rating"].to_numpy())
        out[col] = {"spearman": float(rho), "p_value": float(p)}
    out["by_rating"] = (
        rated.group_by("rating").agg(pl.len().alias("n"), pl.col("entropy_mean").mean(),
                                     pl.col("forking_share").mean()).sort("rating").to_dicts()
    )  # fmt: skip
    return out


def steps_job(tokens_path, sequences_path, labels_path, rules: StepRules, out_path,
              summary_path=None) -> dict:  # fmt: skip
    """One `trace_steps` job: the steps of every trace of a scored text set (a checkpoint's graded
    generations, or a dataset's reference solutions) with their uncertainty; writes one row per
    step (`out_path`) and a JSON summary (the forking threshold, counts, and the correlation with
    per-step ratings where the dataset has them)."""
    import polars as pl

    tokens = pl.read_parquet(tokens_path)
    traces = traces_of(pl.read_parquet(sequences_path), pl.read_parquet(labels_path))
    steps, threshold = step_table(tokens, traces, rules)
    steps.write_parquet(out_path)
    info = {"traces": len(traces), "steps": steps.height, "forking_threshold": threshold,
            "quantile": rules.quantile, "ratings": rating_correlation(steps)}  # fmt: skip
    if summary_path:
        with open(summary_path, "w") as f:
            json.dump(info, f, indent=1)
    log.info("steps: %d traces, %d steps, forking entropy > %.3f", len(traces), steps.height,
             threshold)  # fmt: skip
    return info
