"""The prm800k dataset format: followed completions as the solution, ratings in meta, rejects."""

import json

import pytest

from reasonlab.data import RowError, normalize_record, prepare, read_dataset, write_prepared


def step(*completions, chosen=0, human=None):
    """One PRM800K step: completions given as (text, rating) pairs."""
    return {
        "completions": [{"text": t, "rating": r, "flagged": None} for t, r in completions],
        "human_completion": human,
        "chosen_completion": chosen,
    }


def record(problem, answer, steps, finish_reason, **question):
    return {
        "labeler": "lab-1",
        "timestamp": "2023-01-22T04:34:27",
        "generation": None,
        "is_quality_control_question": False,
        "is_initial_screening_question": False,
        "question": {"problem": problem, "ground_truth_answer": answer, **question},
        "label": {"steps": steps, "total_time": 1000, "finish_reason": finish_reason},
    }


SOLVED = record(
    "What is 2+3?",
    "5",
    [step(("2+3 is 5.", 1)), step(("# Answer\n\n5", 1))],
    "solution",
    ground_truth_solution="$2+3=\\boxed{5}$",
    pre_generated_steps=["2+3 is 5.", "# Answer\n\n5"],
    pre_generated_answer="5",
    pre_generated_verifier_score=0.9,
)
# Phase 2: labelling stops at the first error; the last step has no chosen completion, its first
# completion (the pre-generated step) is the -1 that ends the trace, the others are alternatives.
FOUND_ERROR = record(
    "Let x = 2. What is x^2?",
    "4",
    [step(("We have x = 2.", 0)), step(("So x^2 = 5.", -1), ("So x^2 = 4.", 1), chosen=None)],
    "found_error",
)
# Phase 1: every completion of step 0 was rated -1, so the labeler wrote the step (rating null);
# step 1 continued with its second completion.
HUMAN = record(
    "What is 3*4?",
    "12",
    [
        step(("3*4 is 7.", -1), chosen=None, human={"text": "3*4 is 12.", "rating": None,
                                                     "source": "human", "flagged": False}),
        step(("# Answer\n\n7", -1), ("# Answer\n\n12", 1), chosen=1),
    ],
    "solution",
)  # fmt: skip
NO_STEPS = {"question": {"problem": "What is 1+1?", "ground_truth_answer": "2"},
            "label": {"total_time": 5, "finish_reason": "give_up"}}  # fmt: skip


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "phase2_train.jsonl"
    lines = [json.dumps(r) for r in (SOLVED, FOUND_ERROR, HUMAN, NO_STEPS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def spec(source):
    return {"source": str(source), "format": "prm800k", "split": "test", "config": None,
            "columns": {}}  # fmt: skip


def test_rows_solution_ratings_and_meta(source):
    p = prepare(spec(source), "prm")
    rows = {r["id"]: r for r in p.rows}  # no id field: the line number is the id
    assert list(rows) == ["1", "2", "3"] and [r["row"] for r in p.rows] == [1, 2, 3]
    assert [(r["question"], r["reference"], r["solution"]) for r in p.rows] == [
        ("What is 2+3?", "5", "2+3 is 5.\n\n# Answer\n\n5"),
        ("Let x = 2. What is x^2?", "4", "We have x = 2.\n\nSo x^2 = 5."),
        ("What is 3*4?", "12", "3*4 is 12.\n\n# Answer\n\n12"),
    ]
    metas = [json.loads(r["meta"]) for r in p.rows]
    assert [m["step_ratings"] for m in metas] == [[1, 1], [0, -1], [None, 1]]
    assert [m["finish_reason"] for m in metas] == ["solution", "found_error", "solution"]
    assert metas[0] == {
        "labeler": "lab-1",
        "timestamp": "2023-01-22T04:34:27",
        "generation": None,
        "is_quality_control_question": False,
        "is_initial_screening_question": False,
        "question.ground_truth_solution": "$2+3=\\boxed{5}$",
        "question.pre_generated_steps": ["2+3 is 5.", "# Answer\n\n5"],
        "question.pre_generated_answer": "5",
        "question.pre_generated_verifier_score": 0.9,
        "label.total_time": 1000,
        "step_ratings": [1, 1],
        "step_starts": [0, 11],  # where each labelled step starts in the solution
        "finish_reason": "solution",
    }
    for r, m in zip(p.rows, metas, strict=True):  # the offsets cut the solution into its steps
        starts = [*m["step_starts"], len(r["solution"]) + 2]
        steps = [r["solution"][a : b - 2] for a, b in zip(starts, starts[1:], strict=False)]
        assert "\n\n".join(steps) == r["solution"] and len(steps) == len(m["step_ratings"])
    assert all(r[c] is None for r in p.rows for c in ("system", "type", "subject", "level"))
    assert p.summary["n_read"] == 4 and p.summary["n_rejected"] == 1 and p.summary["n_rows"] == 3


def test_record_without_steps_is_rejected_with_reason_and_raw(source, tmp_path):
    p = prepare(spec(source), "prm")
    out = [tmp_path / "prm.parquet", tmp_path / "prm.rejects.jsonl", tmp_path / "prm.summary.json"]
    write_prepared(p, *out)
    rejects = [json.loads(line) for line in out[1].read_text().splitlines()]
    assert rejects == [
        {
            "row": 4,
            "reason": "missing field 'label.steps' (needed for solution)",
            "raw": json.dumps(NO_STEPS, ensure_ascii=False),
        }
    ]
    df = read_dataset(out[0])
    assert df["id"].to_list() == ["1", "2", "3"]
    assert json.loads(df["meta"][1])["step_ratings"] == [0, -1]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r["question"].pop("problem"), "missing field 'question.problem' (needed for question)"),
        (lambda r: r["question"].update(problem=" "), "field 'question.problem' (question) is empty"),
        (lambda r: r.pop("question"), "missing field 'question' (needed for question)"),
        (lambda r: r.update(label=None), "missing field 'label' (needed for solution)"),
        (lambda r: r["label"].update(steps=[]), "field 'label.steps' (solution) is an empty list"),
        (lambda r: r["label"]["steps"][0].update(chosen_completion=3),
         "label.steps[0]: no completion 3 to follow (chosen_completion 3, 1 completion(s)) and no human_completion"),
        (lambda r: r["label"]["steps"][1]["completions"][0].update(rating=2),
         "label.steps[1]: completion 0 has rating 2; expected -1, 0, 1 or null"),
    ],
)  # fmt: skip
def test_bad_records(change, reason):
    rec = json.loads(json.dumps(SOLVED))
    change(rec)
    with pytest.raises(RowError) as e:
        normalize_record(rec, "prm800k", {})
    assert str(e.value) == reason
