"""The phased data source (common/data/phases.py) that every variant's schedule is: a batch is a pure function
of (seed, position), a restart mid-phase draws what an uninterrupted run would, and each step trains on the
rows of the phase that contains it."""
import numpy as np
import pytest

from common.data import DataError
from common.data.phases import Phase, PhasedData, steps_for_epochs


def rows(n, tag, seq_len=8):
  """n rows whose inputs name their phase (tag) and index."""
  inputs = (tag * 1000 + np.arange(n, dtype=np.int32))[:, None] + np.zeros((1, seq_len), np.int32)
  return dict(inputs=inputs, targets=inputs, segment_ids=np.ones_like(inputs), positions=np.zeros_like(inputs),
              loss_mask=np.ones(inputs.shape, np.float32))


def schedule(seed=0):
  phases = [Phase("a", rows(5, 1), 3), Phase("b", rows(7, 2), 4), Phase("c", rows(3, 3), 2)]
  return PhasedData(phases, rows(5, 9), batch_size=2, seed=seed)


def test_each_step_draws_the_rows_of_its_phase_and_the_last_phase_continues():
  data = schedule()
  expected = [1] * 3 + [2] * 4 + [3] * 2 + [3] * 3
  for step, tag in enumerate(expected):
    assert set(data.train_batch(2 * step)["inputs"][:, 0] // 1000) == {tag}, step
  assert [data.phase_at(s) for s in (0, 2, 3, 6, 7, 8, 50)] == [0, 0, 1, 1, 2, 2, 2]
  assert data.total_steps == 9


def test_a_phase_is_whole_epochs_of_its_rows_in_its_own_order():
  data = schedule(seed=5)
  seen = np.concatenate([data.train_batch(2 * s)["inputs"][:, 0] for s in range(3, 3 + 4)])  # 8 rows of 7
  assert sorted(seen[:7] % 1000) == list(range(7))  # the first epoch: each row once


def test_batches_are_a_pure_function_of_seed_and_position_and_resume_exactly():
  walked = schedule(seed=3)
  stream = [walked.train_batch(2 * s) for s in range(10)]
  for s in (0, 4, 7, 9):  # a fresh source (a restart) at that position
    fresh = schedule(seed=3).train_batch(2 * s)
    for key in stream[s]:
      np.testing.assert_array_equal(fresh[key], stream[s][key])
  other = schedule(seed=4)
  assert any(not np.array_equal(other.train_batch(2 * s)["inputs"], stream[s]["inputs"]) for s in range(10))


def test_eval_batches_pad_the_last_batch_with_empty_rows():
  batches = list(schedule().eval_batches())
  assert len(batches) == 3
  assert batches[-1]["loss_mask"][1:].sum() == 0 and batches[-1]["inputs"][0, 0] == 9004


def test_steps_cover_the_epochs_and_empty_or_stepless_phases_are_refused():
  assert steps_for_epochs(10, 3.0, 4) == 8 and steps_for_epochs(1, 0.1, 16) == 1
  with pytest.raises(DataError, match="'x'"):
    PhasedData([Phase("x", rows(0, 1), 2)], rows(1, 9), batch_size=2, seed=0)
  with pytest.raises(DataError, match="'y'"):
    PhasedData([Phase("y", rows(2, 1), 0)], rows(1, 9), batch_size=2, seed=0)
