"""Two-level bootstrap intervals (training seeds, then images) and paired differences."""

import numpy as np
import pytest

from t2i_personal.evaluation.intervals import bootstrap_interval, one_run_interval, paired_difference


def simulate(rng, seeds, images, mean, seed_spread):
    """0/1 outcomes whose rate moves from run to run (the training seed) around ``mean``."""
    rates = np.clip(rng.normal(mean, seed_spread, size=seeds), 0, 1)
    return (rng.random((seeds, images)) < rates[:, None]).astype(float)


def test_interval_covers_the_true_rate_across_runs_and_images():
    rng = np.random.default_rng(0)
    covered = [bootstrap_interval(simulate(rng, 8, 32, 0.6, 0.1), resamples=500, seed=i) for i in range(200)]
    rate = np.mean([iv.low <= 0.6 <= iv.high for iv in covered])
    assert 0.85 <= rate <= 0.99  # nominal 95 %; the percentile bootstrap runs a little narrow with few seeds


def test_run_to_run_spread_widens_the_interval():
    rng = np.random.default_rng(1)
    steady = bootstrap_interval(simulate(rng, 4, 64, 0.5, 0.0))
    shaky = bootstrap_interval(simulate(rng, 4, 64, 0.5, 0.25))
    assert (shaky.high - shaky.low) > 1.5 * (steady.high - steady.low)
    one_run = bootstrap_interval(simulate(rng, 1, 64, 0.5, 0.0))
    assert one_run.seeds == 1 and one_run.low < one_run.mean < one_run.high  # the images' spread alone


def test_paired_difference_cancels_the_shared_luck():
    rng = np.random.default_rng(2)
    rates = rng.uniform(0.3, 0.7, size=(3, 1))  # an easy and a hard training seed: luck both runs share
    baseline = (rng.random((3, 48)) < rates).astype(float)
    better = baseline.copy()
    for row in better:  # the same images, and in every run 5 of the misses become hits
        row[np.flatnonzero(row == 0)[:5]] = 1.0
    diff = paired_difference(better, baseline)
    assert diff.mean == pytest.approx(5 / 48)
    assert diff.excludes_zero and diff.low > 0.05
    a, b = bootstrap_interval(better), bootstrap_interval(baseline)
    assert a.low < b.high  # unpaired, the two intervals overlap
    same = paired_difference(baseline, baseline)
    assert same.mean == same.low == same.high == 0 and not same.excludes_zero


def test_text_and_refusals():
    iv = bootstrap_interval([[1, 0, 1, 1]], resamples=200)
    assert iv.text().startswith("0.75 [") and paired_difference([[1, 0]], [[0, 0]]).text(signed=True)[0] == "+"
    assert paired_difference([[1, 0]], [[0, 1]]).text(signed=True).endswith("~0")
    with pytest.raises(ValueError, match="same training seeds and images"):
        paired_difference(np.ones((3, 8)), np.ones((2, 8)))
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_interval([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_interval(np.zeros((0, 4)))


def test_one_run_interval_holds_most_new_runs_where_the_mean_interval_does_not():
    rng = np.random.default_rng(3)
    seen = simulate(rng, 8, 64, 0.6, 0.15)
    mean, one_run = bootstrap_interval(seen), one_run_interval(seen)
    assert one_run.high - one_run.low > 1.5 * (mean.high - mean.low)
    new_runs = simulate(rng, 400, 64, 0.6, 0.15).mean(axis=1)  # other machines' runs: other seeds, same recipe
    inside = np.mean((one_run.low <= new_runs) & (new_runs <= one_run.high))
    assert inside >= 0.85 and np.mean((mean.low <= new_runs) & (new_runs <= mean.high)) < 0.6
