"""ZipLine is exact: property tests against the brute-force definition."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stalwart.sync import zipline
from stalwart.sync.zipline import zipline_reference


def check(times):
    columns, spread = zipline(times)
    ref_columns, ref_spread = zipline_reference(times)
    assert spread == ref_spread
    np.testing.assert_array_equal(columns, ref_columns)
    chosen = times[np.arange(len(times)), columns]
    assert chosen.max() - chosen.min() == pytest.approx(spread)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 7).flatmap(lambda n: st.integers(1, 6).flatmap(
    lambda r: arrays(np.float64, (n, r), elements=st.integers(0, 12).map(float)))))
def test_matches_brute_force_with_ties_and_duplicates(times):
    check(np.sort(times, axis=1))  # small integers: many ties and duplicate times


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 20))
def test_matches_brute_force_on_extrapolated_push_times(seed, n, r):
    rng = np.random.default_rng(seed)
    last = rng.uniform(0, 2, (n, 1))
    interval = rng.uniform(0.01, 1, (n, 1))
    check(last + interval * np.arange(1, r + 1))


def test_picks_the_earliest_of_equal_ranges():
    times = np.array([[1.0, 5.0], [1.0, 5.0]])
    columns, spread = zipline(times)
    assert spread == 0 and list(columns) == [0, 0]


def test_a_single_worker_takes_its_first_prediction():
    columns, spread = zipline(np.array([[3.0, 4.0, 5.0]]))
    assert list(columns) == [0] and spread == 0


@pytest.mark.parametrize("bad, message", [
    (np.zeros((0, 3)), "non-empty"), (np.zeros(3), "n x R"),
    (np.array([[2.0, 1.0]]), "sorted ascending"), (np.array([[np.nan, 1.0]]), "finite")])
def test_bad_input_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        zipline(bad)
