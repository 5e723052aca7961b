"""Linear probes: ≈ 100 % on a planted direction, chance on shuffled labels, clear label errors."""

import numpy as np
import pytest

from reasonlab.probes import ProbeError, ProbeOptions, probe_layers


def planted(n=300, layers=3, hidden=16, classes=3, seed=0):
    """Layer 1 carries the label along planted directions; layers 0 and 2 are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, layers, hidden))
    dirs = rng.normal(size=(classes, hidden))
    x[:, 1] += 4.0 * dirs[y]
    return x, y


def test_a_planted_direction_is_found_and_the_shuffled_control_sits_at_chance():
    x, y = planted()
    rows = probe_layers(x, y, ProbeOptions(seed=0))
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert rows[1]["accuracy"] >= 0.97 and rows[1]["ci_low"] > 0.9
    for r in (rows[0], rows[2]):  # noise layers: the probe and its control at chance (1/3)
        assert r["accuracy"] < 0.5
        assert r["shuffled_ci_low"] <= 1 / 3 <= r["shuffled_ci_high"]
    # the control on the planted layer: far below the probe, near chance on average
    assert rows[1]["shuffled_accuracy"] < 0.6
    assert abs(np.mean([r["shuffled_accuracy"] for r in rows]) - 1 / 3) < 0.12
    assert rows[0]["n_train"] + rows[0]["n_test"] == 300 and rows[0]["classes"] == 3
    # the permutation p-value: no shuffle reaches the planted layer; the noise layers' do
    assert rows[1]["p_value"] == pytest.approx(1 / 21)
    assert rows[0]["p_value"] > 0.05 and rows[2]["p_value"] > 0.05


def test_the_control_sits_at_chance_on_clustered_activations():
    """Activations in three tight clusters, one per label: the probe is perfect, and the shuffled
    control's range still holds chance (each shuffle maps whole clusters to one label)."""
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 50)
    centres = rng.normal(size=(3, 16)) * 10
    x = (centres[y] + rng.normal(size=(150, 16)) * 0.1)[:, None, :]
    (row,) = probe_layers(x, y, ProbeOptions(seed=0))
    assert row["accuracy"] == 1.0
    assert row["shuffled_ci_low"] <= 1 / 3 <= row["shuffled_ci_high"]
    # wide: each shuffle moves whole clusters
    assert row["shuffled_ci_high"] - row["shuffled_ci_low"] > 0.3


def test_string_labels_and_bad_labels():
    x, y = planted(classes=2)
    rows = probe_layers(x, np.where(y == 1, "correct", "incorrect"))
    assert rows[1]["accuracy"] > 0.95
    with pytest.raises(ProbeError, match="one class"):
        probe_layers(x, np.zeros(len(y)))
    with pytest.raises(ProbeError, match=r"class 'rare' has 2 examples"):
        probe_layers(x, np.array(["common"] * (len(y) - 2) + ["rare"] * 2))
