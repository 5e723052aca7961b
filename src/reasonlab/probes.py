"""Linear probes per layer on captured activations (seed 001's `LinearProbe`, with controls).

For every layer: a scikit-learn logistic regression (multinomial for more than two classes) on a
stratified training split, accuracy on the held-out split with a 95 % Wilson interval, and the same
probe trained on shuffled training labels (the control: it must sit at chance, otherwise the probe
is learning the split, not the label). The control is a permutation distribution: `control_shuffles`
shuffles, their mean accuracy and the 2.5–97.5 % range of their accuracies, and the permutation
p-value of the probe, (1 + shuffles at least as accurate) / (1 + shuffles). Not a Wilson interval
on pooled predictions: on strongly clustered activations a shuffle maps whole clusters to one
label, so the predictions of one shuffle are not independent and such an interval is far too
narrow. Features are standardised on the training split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reasonlab import ReasonlabError
from reasonlab.grading import wilson


class ProbeError(ReasonlabError):
    """Labels a probe cannot be trained on (one class, too few examples per class)."""


@dataclass(frozen=True)
class ProbeOptions:
    test_fraction: float = 0.3  # held-out share, stratified by label
    c: float = 1.0  # inverse L2 regularisation strength
    max_iter: int = 2000
    seed: int = 0
    min_per_class: int = 4  # refuse labels with fewer examples in some class
    control_shuffles: int = 20  # shuffled-label probes per layer (the permutation distribution)


def probe_layers(
    x: np.ndarray, labels, opts: ProbeOptions | None = None, key: str = "probes"
) -> list[dict]:
    """Probe every layer of `x` ([examples, layers, hidden]) for `labels` (any hashable values, two
    or more classes). Returns one row per layer: layer index, n_train, n_test, classes, accuracy and
    its Wilson interval, chance (the majority class's share of the test split), the shuffled
    control's mean accuracy and 95 % range, and the permutation p-value."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    opts = opts or ProbeOptions()
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 3 or x.shape[0] != len(y):
        raise ProbeError(
            f"{key}: activations must be [examples, layers, hidden] with one label per example, got {x.shape} and {len(y)} labels"
        )
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ProbeError(
            f"{key}: the labels have one class ({classes.tolist()}); a probe needs two or more"
        )
    if counts.min() < opts.min_per_class:
        raise ProbeError(
            f"{key}: class {str(classes[counts.argmin()])!r} has {counts.min()} examples, fewer than "
            f"{opts.min_per_class}; capture more texts or merge classes"
        )
    idx = np.arange(len(y))
    train, test = train_test_split(
        idx, test_size=opts.test_fraction, stratify=y, random_state=opts.seed
    )
    rng = np.random.default_rng(opts.seed)
    shuffles = []
    for _ in range(opts.control_shuffles):
        s = y.copy()
        s[train] = rng.permutation(y[train])
        shuffles.append(s)
    _, test_counts = np.unique(y[test], return_counts=True)
    chance = float(test_counts.max() / len(test))
    rows = []
    for layer in range(x.shape[1]):
        row = {
            "layer": layer,
            "n_train": len(train),
            "n_test": len(test),
            "classes": len(classes),
            "chance": chance,
        }
        accs = []
        for target in [y, *shuffles]:
            clf = make_pipeline(
                StandardScaler(), LogisticRegression(C=opts.c, max_iter=opts.max_iter)
            )
            clf.fit(x[train, layer], target[train])
            accs.append(float((clf.predict(x[test, layer]) == y[test]).mean()))
        k = round(accs[0] * len(test))
        lo, hi = wilson(k, len(test))
        null = np.array(accs[1:])
        row |= {"accuracy": accs[0], "ci_low": lo, "ci_high": hi,
                "shuffled_accuracy": float(null.mean()),
                "shuffled_ci_low": float(np.percentile(null, 2.5)),
                "shuffled_ci_high": float(np.percentile(null, 97.5)),
                "p_value": (1 + int((null >= accs[0]).sum())) / (1 + len(null))}  # fmt: skip
        rows.append(row)
    return rows


def probe_checkpoint(tasks: dict, indexes: dict[str, str], metas: dict[str, str], out_table: str,
                     out_json: str, options: dict | None = None, model: str = "", ckpt: str = "") -> list[dict]:  # fmt: skip
    """One `probes` job: every probe task of one checkpoint. `tasks`: name -> {"set", "label"
    (type, level or correct), "position"}; `indexes`/`metas`: prompt set -> its capture outputs.
    Writes one row per task × layer (Parquet) and seed 001's `probe_accuracies.json`."""
    import json
    from pathlib import Path

    import polars as pl

    from reasonlab.activations import load, read_meta

    opts = ProbeOptions(**(options or {}))
    rows, seed_json = [], {}
    for name, t in sorted(tasks.items()):
        key = f"probes.tasks.{name}"
        df = pl.read_parquet(indexes[t["set"]])
        meta = read_meta(metas[t["set"]])
        position = t.get("position", "last_prompt")
        if position not in meta["positions"]:
            raise ProbeError(f"{key}: position {position!r} was not captured for set {t['set']!r} "
                             f"(captured: {', '.join(meta['positions'])}); add it to activations.positions")  # fmt: skip
        df = df.with_row_index("_row").filter(pl.col(t["label"]).is_not_null())
        if df.height == 0:
            raise ProbeError(f"{key}: no text of set {t['set']!r} has a {t['label']!r} label")
        x = load(df, meta["store"], position)
        if x.ndim == 4:  # prompt_tail:K: the last of the K positions
            x = x[:, :, -1]
        labels = df[t["label"]].cast(pl.String).to_list()
        base = {"model": model, "ckpt": ckpt, "probe": name, "set": t["set"], "label": t["label"],
                "position": position, "n_examples": df.height}  # fmt: skip
        try:
            got = probe_layers(x, labels, opts, key)
        except ProbeError as e:  # this checkpoint's labels cannot be probed: a row that says why
            rows.append(base | {"note": str(e)})
            seed_json[name] = {"note": str(e)}
            continue
        counts = df[t["label"]].cast(pl.String).value_counts(sort=True)
        for r in got:
            r |= base | {"layer": meta["layers"][r["layer"]], "site": meta["sites"][r["layer"]],
                         "smallest_class": int(counts["count"].min()), "note": None}  # fmt: skip
        rows += got
        seed_json[name] = {r["site"]: {"accuracy": r["accuracy"], "shuffled_accuracy": r["shuffled_accuracy"]}
                           for r in got}  # fmt: skip
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(out_table)
    Path(out_json).write_text(json.dumps(seed_json, indent=2) + "\n")
    return rows
