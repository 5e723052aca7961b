"""Turn any configured dataset source into one normalized table.

`prepare(spec, name)` reads a local JSON / JSONL / Parquet / CSV file, a local dataset directory
or a Hugging Face dataset (through the `datasets` library), normalizes each record by the dataset's
`format`, and returns the kept rows, the rejected rows (with their line or record number and the
reason) and a summary. `write_prepared` writes them as

- `{dataset}.parquet`: the columns in `COLUMNS` (all strings but `row`; see the README);
- `{dataset}.rejects.jsonl`: one line per rejected record: row, reason, raw (truncated);
- `{dataset}.summary.json`: counts and where the data came from.

A dataset that keeps no row is an error, and nothing is written for it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reasonlab import ReasonlabError
from reasonlab.answers import gsm8k_final, last_boxed

COLUMNS = [
    "id",
    "row",
    "question",
    "reference",
    "solution",
    "system",
    "type",
    "subject",
    "level",
    "meta",
]
LOCAL_SUFFIXES = {".json", ".jsonl", ".parquet", ".csv"}
RAW_CHARS = 300
MAX_LOGGED_REJECTS = 20
log = logging.getLogger(__name__)


class DatasetError(ReasonlabError):
    """A dataset source cannot be read, or yields no usable row."""


class RowError(Exception):
    """One record cannot be used; the message is the reason recorded in the rejects file, `raw`
    the record's source text where there is no parsed record (a line that is not JSON)."""

    def __init__(self, message: str, raw: str | None = None):
        super().__init__(message)
        self.raw = raw


@dataclass
class Prepared:
    """The outcome of preparing one dataset."""

    rows: list[dict]
    rejects: list[dict]
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- reading


def is_local(source: str) -> bool:
    """Whether `source` is a local file or directory (else a Hugging Face dataset name)."""
    if source.startswith("hub:"):
        return False
    return (
        Path(source).suffix.lower() in LOCAL_SUFFIXES
        or source.startswith(("/", "./", "../", "~"))
        or os.path.exists(os.path.expanduser(source))
    )


def missing_sources(datasets: dict[str, dict], produced_under: str = "results/") -> list[str]:
    """One message per configured local source that does not exist and no rule produces."""
    problems = []
    for name, spec in datasets.items():
        source = spec["source"]
        produced = source.startswith(produced_under)
        if is_local(source) and not produced and not os.path.exists(os.path.expanduser(source)):
            problems.append(
                f"datasets.{name}.source: {source!r} does not exist (relative paths are relative "
                "to the working directory); fix the path, or prefix a hub dataset name with hub:"
            )
    return problems


Record = tuple[int, Any]  # (1-based line or record number, the record or a RowError)


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield (
                    n,
                    RowError(f"not valid JSON: {e.msg} (column {e.colno})", raw=line.rstrip("\n")),
                )


def _read_json(path: Path) -> Iterator[Record]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        if path.suffix == ".json" and e.msg == "Extra data":
            yield from _read_jsonl(path)  # a JSONL file named .json
            return
        raise DatasetError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DatasetError(
                f"{path}: expected a JSON array of records (or an object holding one array)"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of records, found {type(data).__name__}")
    yield from enumerate(data, 1)


def _read_csv(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DatasetError(f"{path}: the CSV file has no header line")
        for rec in reader:
            if None in rec:
                yield (
                    reader.line_num,
                    RowError(f"{len(rec[None])} more field(s) than the header has"),
                )
                continue
            yield reader.line_num, {k: (v if v != "" else None) for k, v in rec.items()}


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DatasetError(f"{path}: not a readable Parquet file: {e}") from None
    yield from enumerate(table.to_pylist(), 1)


def _read_hf(source: str, config: str | None, split: str) -> Iterator[Record]:
    """A Hugging Face dataset: a `save_to_disk` directory, a local dataset directory, or a hub name."""
    import datasets

    name = source.removeprefix("hub:")
    path = Path(os.path.expanduser(name))
    try:
        if path.is_dir() and (
            (path / "state.json").exists() or (path / "dataset_dict.json").exists()
        ):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetError(f"{source}: no split {split!r}; splits are {', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(
            f"{source}: could not load it with the datasets library (config={config!r}, split={split!r}): "
            f"{type(e).__name__}: {e}. Without network, a hub dataset must be in the local cache; or "
            f"download it once and point `source` at a local file."
        ) from None
    yield from enumerate(ds, 1)


def read_records(source: str, config: str | None = None, split: str = "test") -> Iterator[Record]:
    """(number, record) pairs from any supported source; unreadable records come as RowError."""
    if not is_local(source):
        yield from _read_hf(source, config, split)
        return
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise DatasetError(f"{source}: no such file or directory")
    if path.is_dir():
        yield from _read_hf(str(path), config, split)
        return
    readers: dict[str, Callable[[Path], Iterator[Record]]] = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(
            f"{source}: unknown file type {path.suffix!r}; use .json, .jsonl, .parquet or .csv"
        )
    yield from reader(path)


# ------------------------------------------------------------------------------------ normalizing

# For each format, normalized field → the source field it comes from by default.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "gsm8k": {"question": "question", "solution": "answer"},
    "math": {
        "question": "problem",
        "solution": "solution",
        "reference": "answer",
        "subject": "type",
        "level": "level",
    },
    "chat": {"messages": "messages"},
    "alpaca": {
        "instruction": "instruction",
        "input": "input",
        "solution": "output",
        "type": "type",
        "system": "system",
        "reference": "answer",
    },  # fmt: skip
    "query": {"question": "query", "reference": "answer"},
    "prm800k": {"question": "question", "label": "label"},  # objects; see _prm800k
    "columns": {},
}
REQUIRED = {"gsm8k": ["question", "solution"], "math": ["question", "solution"], "chat": ["messages"],
            "alpaca": ["instruction"], "query": ["question"], "prm800k": ["question", "label"],
            "columns": ["question"]}  # fmt: skip
PRM_RATINGS = (-1, 0, 1)
CHAT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system", "model": "assistant"}  # fmt: skip


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from CSV/Parquet
        return None
    return value if isinstance(value, str) else str(value)


def _get(rec: dict, mapping: dict[str, str], key: str, required: bool) -> str | None:
    col = mapping.get(key)
    if col is None:
        return None
    if col not in rec:
        if required:
            raise RowError(f"missing field {col!r} (needed for {key})")
        return None
    value = _text(rec[col])
    if required and (value is None or not value.strip()):
        raise RowError(f"field {col!r} ({key}) is empty")
    return value


def _chat(rec: dict, mapping: dict[str, str]) -> dict:
    col = mapping.get("messages", "messages")
    if col not in rec and col == "messages" and "conversations" in rec:
        col = "conversations"
    messages = rec.get(col)
    if not isinstance(messages, list) or not messages:
        raise RowError(
            f"field {col!r} must be a non-empty list of messages (also tried 'conversations')"
        )
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(f"message {i} is not an object with role and content")
        role = CHAT_ROLES.get(str(m.get("role", m.get("from", ""))).lower())
        content = m.get("content", m.get("value"))
        if role is None or not isinstance(content, str):
            raise RowError(f"message {i} needs a role (system/user/assistant) and a text content")
        turns.append((role, content))
    system = next((c for r, c in turns if r == "system"), None)
    solution = turns[-1][1] if turns[-1][0] == "assistant" else None
    users = [c for r, c in (turns[:-1] if solution is not None else turns) if r == "user"]
    if not users or not users[-1].strip():
        raise RowError("no user message to use as the question")
    return {"question": users[-1], "solution": solution, "system": system,
            "reference": last_boxed(solution), "meta_used": {col}}  # fmt: skip


def _prm800k_object(rec: dict, col: str, key: str) -> dict:
    if rec.get(col) is None:
        raise RowError(f"missing field {col!r} (needed for {key})")
    if not isinstance(rec[col], dict):
        raise RowError(
            f"field {col!r} must be an object (a PRM800K record), found {type(rec[col]).__name__}"
        )
    return rec[col]


def _prm800k_step(where: str, step: Any) -> tuple[str, int | None]:
    """The text and rating of the completion one PRM800K step (`where`, for errors) continued with."""
    if not isinstance(step, dict):
        raise RowError(f"{where} must be an object with completions, found {type(step).__name__}")
    human = step.get("human_completion")
    if human is not None:
        text = human.get("text") if isinstance(human, dict) else human
        if not isinstance(text, str):
            raise RowError(f"{where}: human_completion has no text")
        return text, None
    completions, chosen = step.get("completions"), step.get("chosen_completion")
    k = 0 if chosen is None else chosen
    n = len(completions) if isinstance(completions, list) else 0
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
        raise RowError(
            f"{where}: no completion {k!r} to follow (chosen_completion {chosen!r}, {n} "
            "completion(s)) and no human_completion"
        )
    c = completions[k]
    text = c.get("text") if isinstance(c, dict) else None
    if not isinstance(text, str):
        raise RowError(f"{where}: completion {k} has no text")
    rating = c.get("rating")
    if rating is not None and (isinstance(rating, bool) or rating not in PRM_RATINGS):
        raise RowError(f"{where}: completion {k} has rating {rating!r}; expected -1, 0, 1 or null")
    return text, None if rating is None else int(rating)


def _prm800k(rec: dict, mapping: dict[str, str]) -> dict:
    """One PRM800K label record (github.com/openai/prm800k) → question (`question.problem`),
    reference (`question.ground_truth_answer`) and solution: the text each step of `label.steps`
    continued with, joined with a blank line. A step continues with its `human_completion` when
    there is one (rating null), else with `completions[chosen_completion]`, else (chosen_completion
    null: the last step of a found_error or give_up trace) with completion 0, in phase 2 the
    pre-generated step, the one rated -1 that ends a found_error trace. Other completions are not
    kept. A step's own text may hold a blank line (the final step is often "…\n\n# Answer\n\n5"),
    so the labelled steps' character offsets in the solution are kept too (`step_starts`): the
    trace explorer splits such a solution there, not at blank lines.

    Meta gets `step_ratings` (the followed completion's rating per step, null where unknown),
    `step_starts`,
    `finish_reason`, and the two objects' other fields under dotted names
    (`question.ground_truth_solution`, `question.pre_generated_steps`, `label.total_time`, …)."""
    qcol, lcol = mapping["question"], mapping["label"]
    q = _prm800k_object(rec, qcol, "question")
    problem = _text(q.get("problem"))
    if problem is None:
        raise RowError(f"missing field '{qcol}.problem' (needed for question)")
    if not problem.strip():
        raise RowError(f"field '{qcol}.problem' (question) is empty")
    label = _prm800k_object(rec, lcol, "solution")
    steps = label.get("steps")
    if steps is None:
        raise RowError(f"missing field '{lcol}.steps' (needed for solution)")
    if not isinstance(steps, list):
        raise RowError(
            f"field '{lcol}.steps' must be a list of steps, found {type(steps).__name__}"
        )
    if not steps:
        raise RowError(f"field '{lcol}.steps' (solution) is an empty list")
    followed = [_prm800k_step(f"{lcol}.steps[{i}]", step) for i, step in enumerate(steps)]
    texts, ratings = [t for t, _ in followed], [r for _, r in followed]
    extra = {f"{qcol}.{k}": v for k, v in q.items() if k not in ("problem", "ground_truth_answer")}
    extra |= {f"{lcol}.{k}": v for k, v in label.items() if k not in ("steps", "finish_reason")}
    starts = [sum(len(t) + 2 for t in texts[:i]) for i in range(len(texts))]
    extra |= {
        "step_ratings": ratings,
        "step_starts": starts,
        "finish_reason": label.get("finish_reason"),
    }
    return {"question": problem, "reference": _text(q.get("ground_truth_answer")),
            "solution": "\n\n".join(texts), "meta_used": {qcol, lcol}, "meta_extra": extra}  # fmt: skip


def normalize_record(rec: Any, fmt: str, columns: dict[str, str]) -> dict:
    """One source record → the normalized fields (question, reference, solution, …). Raises RowError."""
    if not isinstance(rec, dict):
        raise RowError(f"a record must be an object, found {type(rec).__name__}")
    mapping = {**DEFAULT_COLUMNS[fmt], **columns}
    required = set(REQUIRED[fmt])
    extra: dict[str, Any] = {}  # meta entries a format derives (prm800k's step_ratings, …)
    if fmt == "chat":
        out = _chat(rec, mapping)
        used = out.pop("meta_used")
    elif fmt == "prm800k":
        out = _prm800k(rec, mapping)
        used, extra = out.pop("meta_used"), out.pop("meta_extra")
    else:
        out = {k: _get(rec, mapping, k, k in required) for k in mapping if k not in ("id",)}
        used = {mapping[k] for k in mapping}
    if fmt == "alpaca":
        parts = [p for p in (out.pop("instruction"), out.pop("input")) if p and p.strip()]
        out["question"] = "\n".join(parts)
        if out.get("reference") is None:
            out["reference"] = last_boxed(out.get("solution"))
    elif fmt == "gsm8k":
        out["reference"] = out.get("reference") or gsm8k_final(out["solution"])
    elif fmt == "math" and out.get("reference") is None:
        out["reference"] = last_boxed(out["solution"])
    if (
        fmt == "math"
        and out.get("subject") is None
        and "subject" in rec
        and "subject" not in columns
    ):
        out["subject"], used = _text(rec["subject"]), used | {"subject"}
    for key in ("system", "type", "subject", "level", "solution", "reference"):
        out.setdefault(key, None)
    id_col = columns.get("id") or ("id" if "id" in rec else None)
    out["id"] = _text(rec.get(id_col)) if id_col else None
    if id_col and out["id"] is None:
        raise RowError(f"id field {id_col!r} is missing or empty")
    used |= {id_col} if id_col else set()
    meta = {k: v for k, v in rec.items() if k not in used} | extra
    out["meta"] = (
        json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str) if meta else None
    )
    return out


def _raw(rec: Any) -> str:
    if isinstance(rec, RowError):
        s = rec.raw or ""
    else:
        s = json.dumps(rec, ensure_ascii=False, default=str)
    return s if len(s) <= RAW_CHARS else s[:RAW_CHARS] + "…"


def prepare(spec: dict, name: str, progress: bool = False) -> Prepared:
    """Read and normalize one `datasets.<name>` entry of the config. Raises DatasetError if no row is kept."""
    fmt, columns = spec["format"], spec.get("columns") or {}
    source = spec["source"]
    rows, rejects, seen = [], [], {}
    records = read_records(source, spec.get("config"), spec.get("split", "test"))
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc=f"reading {name}", unit="rows", mininterval=2)
    n_read = 0
    for n, rec in records:
        n_read += 1
        try:
            if isinstance(rec, RowError):
                raise rec
            out = normalize_record(rec, fmt, columns)
            out["row"] = n
            if out["id"] is None:
                out["id"] = str(n)
            if out["id"] in seen:
                raise RowError(f"duplicate id {out['id']!r} (first at row {seen[out['id']]})")
            seen[out["id"]] = n
            rows.append(out)
        except RowError as e:
            rejects.append({"row": n, "reason": str(e), "raw": _raw(rec)})
    n_valid = len(rows)
    for r in rejects[:MAX_LOGGED_REJECTS]:
        log.warning("datasets.%s: rejected row %d: %s", name, r["row"], r["reason"])
    if len(rejects) > MAX_LOGGED_REJECTS:
        log.warning(
            "datasets.%s: ... and %d more rejected rows", name, len(rejects) - MAX_LOGGED_REJECTS
        )
    n, seed = spec.get("num_samples"), spec.get("seed")
    if n is not None and n < len(rows):
        if seed is None:
            rows = rows[:n]
        else:
            keep = sorted(random.Random(seed).sample(range(len(rows)), n))
            rows = [rows[i] for i in keep]
    if not rows:
        detail = (
            f"; the first reject: row {rejects[0]['row']}: {rejects[0]['reason']}"
            if rejects
            else ""
        )
        raise DatasetError(
            f"datasets.{name}: no usable row in {source} ({n_read} read, {len(rejects)} rejected){detail}. "
            f"Check `format` ({fmt}) and `columns`."
        )
    summary = {
        "dataset": name,
        "source": source,
        "format": fmt,
        "n_read": n_read,
        "n_rejected": len(rejects),
        "n_valid": n_valid,
        "n_rows": len(rows),
        "n_without_reference": sum(r["reference"] is None for r in rows),
        "num_samples": n,
        "seed": seed,
    }
    return Prepared([{c: r[c] for c in COLUMNS} for r in rows], rejects, summary)


def to_table(rows: list[dict]):
    """The normalized rows as a pyarrow Table with the documented schema."""
    import pyarrow as pa

    schema = pa.schema([("row", pa.int64()) if c == "row" else (c, pa.string()) for c in COLUMNS])
    return pa.Table.from_pylist(rows, schema=schema)


def write_prepared(
    p: Prepared, parquet: str | Path, rejects: str | Path, summary: str | Path
) -> None:
    """Write the three outputs; each goes to a temporary name first, so none is left half-written."""
    import pyarrow.parquet as pq

    outs = [Path(parquet), Path(rejects), Path(summary)]
    for o in outs:
        o.parent.mkdir(parents=True, exist_ok=True)
    tmp = [o.with_name(o.name + ".tmp") for o in outs]
    pq.write_table(to_table(p.rows), tmp[0])
    with tmp[1].open("w", encoding="utf-8") as f:
        for r in p.rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp[2].write_text(json.dumps(p.summary, indent=2) + "\n")
    for t, o in zip(tmp, outs, strict=True):
        os.replace(t, o)


def read_dataset(path: str | Path):
    """A prepared dataset Parquet as a polars DataFrame, its columns checked."""
    import polars as pl

    df = pl.read_parquet(path)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; re-run prepare_dataset")
    return df
