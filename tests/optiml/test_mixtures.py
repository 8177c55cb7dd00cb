"""The sampling rates of common.data.mixtures against hand-computed cases, and the bench's mixture built on
them."""
import ml_collections
import numpy as np
import pytest

from common.data import DataError, mixtures
from optiml import data as D
from optiml.configs.tiny import data_config


def test_examples_proportional_with_a_cap():
  # sizes 10, 100, 1000 capped at 100: 10 / 210, 100 / 210, 100 / 210
  np.testing.assert_allclose(mixtures.examples_proportional([10, 100, 1000], cap=100), [10 / 210, 100 / 210, 100 / 210])
  np.testing.assert_allclose(mixtures.examples_proportional([10, 30]), [0.25, 0.75])


def test_temperature_flattens_toward_uniform():
  # T = 2: weights sqrt(16), sqrt(64) = 4, 8
  np.testing.assert_allclose(mixtures.temperature_rates([16, 64], 2.0), [1 / 3, 2 / 3])
  np.testing.assert_allclose(mixtures.temperature_rates([16, 64], 1.0), [0.2, 0.8])
  np.testing.assert_allclose(mixtures.temperature_rates([16, 64], 1e9), [0.5, 0.5], atol=1e-6)
  with pytest.raises(DataError, match="temperature"):
    mixtures.temperature_rates([1], 0.0)


def test_group_proportions_split_each_group_by_the_within_rates():
  within = mixtures.examples_proportional([10, 30, 60])
  rates = mixtures.group_proportions(["a", "a", "b"], {"a": 0.2, "b": 0.6, "c": 0.2}, within)
  # c has no task: a and b renormalised to 0.25 and 0.75; a's share split 10:30
  np.testing.assert_allclose(rates, [0.0625, 0.1875, 0.75])
  with pytest.raises(DataError, match="no proportion for group 'b'"):
    mixtures.group_proportions(["a", "b"], {"a": 1.0}, [0.5, 0.5])


def test_sample_counts_follow_the_rates_and_sum_to_the_total():
  counts = mixtures.sample_counts([0.5, 0.3, 0.2], 7)   # exact 3.5, 2.1, 1.4 -> 3, 2, 1 + one to the 0.5
  assert counts.tolist() == [4, 2, 1]
  assert mixtures.sample_counts([0.25, 0.75], 100).tolist() == [25, 75]


def test_the_bench_mixture_caps_tasks_and_keeps_component_shares():
  tasks = [D.TaskSpec(f"t{i}", "c", b, ("I.",), "exact_match", tuple(D.instance(str(j), "x") for j in range(n)))
           for i, (b, n) in enumerate([("flan", 10), ("flan", 500), ("niv2", 50)])]
  tasks.append(D.TaskSpec("cot", "reasoning", "reasoning", ("I.",), "exact_match", (D.instance("1", "2"),)))
  cfg = ml_collections.ConfigDict(dict(data_config("instruct"), task_cap=50, proportions="examples",
                                       component_share=0.1, sampling="proportional"))
  rates = D.mixture_rates(tasks, cfg)
  # capped sizes 10, 50, 50 share 0.9; the reasoning component 0.1
  np.testing.assert_allclose(rates, [0.9 * 10 / 110, 0.9 * 50 / 110, 0.9 * 50 / 110, 0.1])
  cfg.proportions = "uniform"
  np.testing.assert_allclose(D.mixture_rates(tasks, cfg), [0.45 * 10 / 60, 0.45 * 50 / 60, 0.45, 0.1])
