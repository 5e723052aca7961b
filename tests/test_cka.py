"""CKA against its defining properties and an independent feature-space computation, and the
direction-cosine matrix."""

import numpy as np
import pytest
from scipy.stats import ortho_group

from reasonlab.cka import AlignmentError, LinearCKA, debiased_cka, direction_cosines, linear_cka


def example():
    # the reference implementation's own example (Kornblith et al.'s demo notebook)
    rng = np.random.RandomState(1337)
    x = rng.randn(100, 10)
    return x, rng.randn(100, 10) + x


def gram_cka(x, y):
    """An independent computation: centred Gram matrices, HSIC as a trace."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h  # noqa: E741
    return np.trace(k @ l) / np.sqrt(np.trace(k @ k) * np.trace(l @ l))


def feature_debiased(x, y):
    """Debiased linear CKA by the feature-space identity for the unbiased HSIC (no Gram matrix)."""
    n = x.shape[0]

    def hsic(a, b):
        ra, rb = (a * a).sum(1), (b * b).sum(1)
        return (
            np.linalg.norm(a.T @ b) ** 2
            - n / (n - 2) * ra @ rb
            + ra.sum() * rb.sum() / ((n - 1) * (n - 2))
        )

    x, y = x - x.mean(0), y - y.mean(0)
    return hsic(x, y) / np.sqrt(hsic(x, x) * hsic(y, y))


def test_cka_equals_independent_computations_on_the_reference_example():
    x, y = example()
    assert linear_cka(x, y) == pytest.approx(gram_cka(x, y), abs=1e-12)
    assert debiased_cka(x, y) == pytest.approx(feature_debiased(x, y), abs=1e-12)
    assert 0 < debiased_cka(x, y) < linear_cka(x, y) < 1  # debiasing removes the positive bias
    # the values the reference implementation printed on this example (google-research
    # representation_similarity/Demo.ipynb, outputs of cells 45qb6zdSsHj6 and jInZLKpx3fV8):
    # "Linear CKA from Examples: 0.55761", "... (Debiased): 0.51346"
    assert round(linear_cka(x, y), 5) == 0.55761
    assert round(debiased_cka(x, y), 5) == 0.51346


def test_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12))
    y = x @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(60, 7))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert debiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q = ortho_group.rvs(12, random_state=1)
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-12)  # orthogonal transforms
    assert linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-12)  # isotropic scaling
    assert linear_cka(x + 5.0, y) == pytest.approx(base, abs=1e-12)  # translation
    assert debiased_cka(x @ q * 2.0, y) == pytest.approx(debiased_cka(x, y), abs=1e-12)
    # independent representations: CKA shrinks with n, debiased CKA centres on 0
    a, b = rng.normal(size=(2000, 5)), rng.normal(size=(2000, 5))
    assert abs(debiased_cka(a, b)) < 0.01


def test_a_constant_representation_has_no_cka_and_large_offsets_do_not_cancel():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 6))
    const = np.tile(rng.normal(size=6) * 100, (50, 1))  # every input gives the same vector
    assert np.isnan(linear_cka(const, x)) and np.isnan(debiased_cka(x, const))
    # features far from zero with small spread: centring must not cancel catastrophically
    y = 1e4 + 1e-2 * x @ rng.normal(size=(6, 6))
    assert linear_cka(y, x, batch=7) == pytest.approx(gram_cka(y - 1e4, x), abs=1e-9)


def test_minibatches_give_the_full_batch_value():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(1003, 16)) + 2.0, rng.normal(size=(1003, 9))
    y[:, :3] += x[:, :3]
    acc = LinearCKA()
    for s in range(0, 1003, 97):
        acc.update(x[s : s + 97], y[s : s + 97])
    assert acc.value() == pytest.approx(gram_cka(x, y), abs=1e-10)
    assert linear_cka(x, y, batch=10) == pytest.approx(linear_cka(x, y, batch=5000), abs=1e-12)


def test_direction_cosines_and_width_mismatch():
    names, m = direction_cosines(
        {"a": np.array([1.0, 0, 0]), "b": np.array([1.0, 1, 0]), "c": -np.array([2.0, 0, 0])}
    )
    assert names == ["a", "b", "c"]
    assert m[0, 1] == pytest.approx(1 / np.sqrt(2)) and m[0, 2] == pytest.approx(-1.0)
    np.testing.assert_allclose(np.diag(m), 1.0)
    with pytest.raises(
        AlignmentError,
        match=r"cka.cosines: .* different widths .* tiny/final \(3\), big/base \(4\)",
    ):
        direction_cosines({"tiny/final": np.ones(3), "big/base": np.ones(4)}, key="cka.cosines")
    with pytest.raises(AlignmentError, match="same inputs"):
        linear_cka(np.ones((5, 2)), np.ones((6, 2)))
