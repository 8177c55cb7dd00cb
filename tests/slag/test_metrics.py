"""The metrics, on cases worked by hand the way the official code counts them (percentages)."""
import math

import pytest

from slag import metrics


def test_update_success_is_the_share_of_updated_points_at_their_desired_label():
  assert metrics.update_success([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(50.0)


def test_retain_rate_counts_unchanged_predictions_whatever_the_labels():
  assert metrics.retain_rate([0, 1, 1, 0, 1], [0, 1, 0, 0, 0]) == pytest.approx(60.0)


def test_delta_accuracy_is_after_minus_before_on_the_labels():
  # before: 2/4 right; after: 3/4 right
  assert metrics.delta_accuracy([1, 0, 0, 1], [1, 1, 0, 1], [1, 1, 1, 1]) == pytest.approx(25.0)
  assert metrics.delta_accuracy([1, 1], [0, 0], [1, 1]) == pytest.approx(-100.0)


def test_paraphrase_consistency_pools_agreeing_pairs_over_points():
  # point 1: preds (1, 1, 0): pairs 11 10 10 -> 1 of 3; point 2: (0, 0): 1 of 1; total 2 of 4
  assert metrics.matching_pairs([[1, 1, 0], [0, 0]]) == (2, 4)
  assert metrics.paraphrase_consistency([[1, 1, 0], [0, 0]]) == pytest.approx(50.0)
  assert math.isnan(metrics.paraphrase_consistency([[1]]))


def test_entailment_accuracy_and_corruption():
  assert metrics.entailment_accuracy([1, 1, 0], [1, 0, 0]) == pytest.approx(200 / 3)
  # right before: indices 0, 2, 3; of those wrong after: 2
  assert metrics.corrupted([1, 0, 0, 1], [1, 0, 1, 1], [1, 1, 0, 1]) == (1, 3)
