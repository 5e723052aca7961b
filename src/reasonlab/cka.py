"""Centered kernel alignment (CKA) between two sets of representations of the same inputs, and the
cosine similarity of directions across checkpoints.

Linear CKA (Kornblith et al. 2019) of X [n, d1] and Y [n, d2], both centred over the n inputs:

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)

computed in float64. `LinearCKA` accumulates the three cross-products in feature space over
minibatches of inputs (centring by subtracting n·mean·mean^T at the end, exactly), so memory is
d1·d2 + d1² + d2² doubles whatever n is. The debiased estimator (Nguyen et al. 2021, from the
unbiased HSIC estimator of Song et al. 2012) needs the [n, n] Gram matrices: `debiased_cka`.
"""

from __future__ import annotations

import numpy as np

from reasonlab import ReasonlabError


class AlignmentError(ReasonlabError):
    """Representations that cannot be compared (different numbers of inputs or widths)."""


def _check(x: np.ndarray, y: np.ndarray, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise AlignmentError(
            f"CKA{what} needs two [inputs, features] arrays over the same inputs, got {x.shape} and {y.shape}"
        )
    return x, y


class LinearCKA:
    """Linear CKA accumulated over minibatches of the same inputs (rows) of X and Y."""

    def __init__(self):
        self.n = 0
        self.sx = self.sy = self.xx = self.yy = self.yx = None

    def update(self, x, y) -> LinearCKA:
        x, y = _check(x, y)
        if self.sx is None:
            # sums are taken around the first batch's means: near-constant features then do not
            # cancel catastrophically when the overall mean is subtracted at the end
            self.x0, self.y0 = x.mean(0), y.mean(0)
            self.scale = max(np.abs(x).max(), 1e-300), max(np.abs(y).max(), 1e-300)
            self.sx, self.sy = np.zeros(x.shape[1]), np.zeros(y.shape[1])
            self.xx = np.zeros((x.shape[1], x.shape[1]))
            self.yy = np.zeros((y.shape[1], y.shape[1]))
            self.yx = np.zeros((y.shape[1], x.shape[1]))
        x, y = x - self.x0, y - self.y0
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.yy += y.T @ y
        self.yx += y.T @ x
        return self

    def value(self) -> float:
        """CKA, or NaN where either representation does not vary over the inputs (every input
        gives the same vector, as a layer's input at a position every prompt shares can)."""
        if self.n < 2:
            return float("nan")
        mx, my = self.sx / self.n, self.sy / self.n
        xx = self.xx - self.n * np.outer(mx, mx)
        yy = self.yy - self.n * np.outer(my, my)
        yx = self.yx - self.n * np.outer(my, mx)
        nx, ny = np.linalg.norm(xx), np.linalg.norm(yy)
        if not _varies(nx, self.scale[0], self.n) or not _varies(ny, self.scale[1], self.n):
            return float("nan")
        return float(np.sum(yx * yx) / (nx * ny))


def _varies(norm_cov: float, scale: float, n: int) -> bool:
    """Whether a centred cross-product's norm is above rounding (relative to the values' size)."""
    return norm_cov > 1e-20 * n * scale * scale


def linear_cka(x, y, batch: int = 4096) -> float:
    """Linear CKA of X [n, d1] and Y [n, d2] (float64; minibatches of `batch` rows)."""
    x, y = _check(x, y)
    acc = LinearCKA()
    for s in range(0, x.shape[0], batch):
        acc.update(x[s : s + batch], y[s : s + batch])
    return acc.value()


def _unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al.'s unbiased HSIC estimator on Gram matrices (their diagonals are set to zero)."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones = np.ones(n)
    trace = np.sum(k * l)
    middle = (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * (ones @ k) @ (l @ ones)
    return (trace + middle - last) / (n * (n - 3))


def debiased_cka(x, y) -> float:
    """Debiased linear CKA of X [n, d1] and Y [n, d2] (n > 3), from [n, n] Gram matrices."""
    x, y = _check(x, y, " (debiased)")
    if x.shape[0] < 4:
        raise AlignmentError(f"debiased CKA needs at least 4 inputs, got {x.shape[0]}")
    sx, sy = max(np.abs(x).max(), 1e-300), max(np.abs(y).max(), 1e-300)
    x = x - x.mean(0)
    y = y - y.mean(0)
    if np.abs(x).max() <= 1e-10 * sx or np.abs(y).max() <= 1e-10 * sy:
        return float("nan")  # a representation that does not vary over the inputs
    k, l = x @ x.T, y @ y.T  # noqa: E741
    denom = np.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(l, l))
    return float(_unbiased_hsic(k, l) / denom) if denom > 0 else float("nan")


def cka_matrix(xs: list, ys: list, debiased: bool = False) -> np.ndarray:
    """CKA of every layer pair: xs[i] and ys[j] are [n, d] arrays over the same inputs."""
    fn = debiased_cka if debiased else linear_cka
    return np.array([[fn(x, y) for y in ys] for x in xs])


def direction_cosines(
    directions: dict[str, np.ndarray], key: str = "directions"
) -> tuple[list, np.ndarray]:
    """(names, [k, k] cosine matrix) of named direction vectors, which must share one width."""
    names = list(directions)
    widths = {n: np.asarray(v).shape[-1] for n, v in directions.items()}
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{n} ({w})" for n, w in widths.items())
        raise AlignmentError(
            f"{key}: directions of different widths cannot be compared by cosine: {listed}; "
            "compare checkpoints of one model, or models of the same hidden size"
        )
    m = np.stack([np.asarray(directions[n], dtype=np.float64) for n in names])
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    unit = m / np.where(norms > 0, norms, 1.0)
    return names, unit @ unit.T


def cka_pair(index_a: str, meta_a: str, index_b: str, meta_b: str, out_table: str, out_json: str,
             position: str = "last_prompt", debiased: bool = True, names: tuple[str, str] = ("a", "b"),
             key: str = "cka") -> dict:  # fmt: skip
    """One `cka` job: linear (and debiased) CKA of every layer pair between two handles' captures
    of the same prompt set, on the texts both hold (joined on id). Writes a table (one row per
    layer pair) and seed 001's `alignment_results.json`."""
    import json
    from pathlib import Path

    import polars as pl

    from reasonlab.activations import load, read_meta

    ma, mb = read_meta(meta_a), read_meta(meta_b)
    for m, n in ((ma, names[0]), (mb, names[1])):
        if position not in m["positions"]:
            raise AlignmentError(
                f"{key}.position: {position!r} was not captured for {n} (captured: {', '.join(m['positions'])})"
            )
    a, b = pl.read_parquet(index_a), pl.read_parquet(index_b)
    both = a.select("id", "text_key").join(b.select("id", "text_key"), on="id", suffix="_b")
    if both.height < 4:
        raise AlignmentError(
            f"{key}: {names[0]} and {names[1]} share {both.height} texts; CKA needs at least 4 (use a dataset prompt set, not generations)"
        )
    ids = both["id"].to_list()
    xa = load(
        a.filter(pl.col("id").is_in(ids)).sort(
            pl.col("id").replace_strict({k: i for i, k in enumerate(ids)})
        ),
        ma["store"],
        position,
    )
    xb = load(
        b.filter(pl.col("id").is_in(ids)).sort(
            pl.col("id").replace_strict({k: i for i, k in enumerate(ids)})
        ),
        mb["store"],
        position,
    )
    if xa.ndim == 4:
        xa, xb = xa[:, :, -1], xb[:, :, -1]
    rows = []
    for i, la in enumerate(ma["layers"]):
        for j, lb in enumerate(mb["layers"]):
            r = {"layer_a": la, "layer_b": lb, "site_a": ma["sites"][i], "site_b": mb["sites"][j],
                 "cka": linear_cka(xa[:, i], xb[:, j])}  # fmt: skip
            if debiased:
                r["cka_debiased"] = debiased_cka(xa[:, i], xb[:, j])
            rows.append(r)
    df = pl.DataFrame(rows).with_columns(
        a=pl.lit(names[0]), b=pl.lit(names[1]), position=pl.lit(position), n_texts=pl.lit(len(ids))
    )
    df.write_parquet(out_table)
    summary = {"a": names[0], "b": names[1], "position": position, "n_texts": len(ids),
               "same_layer_cka": {r["site_a"]: r["cka"] for r in rows if r["layer_a"] == r["layer_b"]}}  # fmt: skip
    Path(out_json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
