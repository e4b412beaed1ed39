"""Shared pieces of the round benchmarks: random round data, timing in turns.

benchmarks/round_throughput.py and benchmarks/tiered_round.py feed their
rounds the same kind of random data and time the rounds they compare in
turns (A B A B ...), so that drift in the host's load hits every side alike
and their ratio holds even when absolute times do not.

Shapes as in conformer_fl/__init__.py.
"""

from collections.abc import Callable, Mapping
import statistics
import time
from typing import Any

import numpy as np


def random_asr_batches(rng: np.random.Generator, shape: tuple[int, ...],
                       num_samples: int, label_length: int,
                       vocab_size: int) -> dict[str, np.ndarray]:
  """Random utterances of leading shape `shape` (e.g. [C, K, B]).

  Returns:
    'audio' float32 [..., S] (S = num_samples): uniform in [-0.1, 0.1],
    S / 2 to S real samples each, zero after them; 'audio_paddings'
    float32 [..., S] (1 = padding); 'labels' int32 [..., U]
    (U = label_length): 1 to U real ids in [1, vocab_size), 0 after them;
    'label_paddings' float32 [..., U].
  """
  audio = 0.1 * rng.uniform(-1, 1, size=shape + (num_samples,))
  lengths = rng.integers(num_samples // 2, num_samples + 1, size=shape)
  audio_paddings = np.arange(num_samples) >= lengths[..., None]
  label_lengths = rng.integers(1, label_length + 1, size=shape)
  label_paddings = np.arange(label_length) >= label_lengths[..., None]
  labels = rng.integers(1, vocab_size, size=shape + (label_length,))
  return {
      "audio": np.where(audio_paddings, 0, audio).astype(np.float32),
      "audio_paddings": audio_paddings.astype(np.float32),
      "labels": np.where(label_paddings, 0, labels).astype(np.int32),
      "label_paddings": label_paddings.astype(np.float32),
  }


def all_real_round(batches: dict[str, np.ndarray], clients: int,
                   local_steps: int, batch: int) -> Any:
  """The round_data.RoundData of `batches` [C, K, B, ...], every example and
  step real.

  Returns:
    RoundData: batches `batches` and 'example_mask' float32 [C, K, B],
    step_mask float32 [C, K] (all ones), num_examples float32 [C] (K * B
    each).
  """
  from conformer_fl.federated import round_data  # pylint: disable=g-import-not-at-top
  return round_data.RoundData(
      batches=dict(batches, example_mask=np.ones(
          (clients, local_steps, batch), np.float32)),
      step_mask=np.ones((clients, local_steps), np.float32),
      num_examples=np.full((clients,), local_steps * batch, np.float32))


def time_in_turns(runs: Mapping[str, Callable[[], Any]], repeats: int
                  ) -> tuple[dict[str, float], dict[str, list[float]]]:
  """Wall times of each run: one first call each, then `repeats` turns.

  Every run is called once (compile and run) in the order of `runs`, then
  `repeats` times in turns (A B A B ...); each call is waited for with
  `jax.block_until_ready`.

  Returns:
    ({name: seconds of the first call}, {name: [seconds of each timed call]}).
  """
  import jax  # pylint: disable=g-import-not-at-top
  first_call = {}
  for name, run in runs.items():
    start = time.perf_counter()
    jax.block_until_ready(run())
    first_call[name] = time.perf_counter() - start
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append(time.perf_counter() - start)
  return first_call, times


def median_seconds_in_turns(runs: Mapping[str, Callable[[], Any]],
                            repeats: int) -> dict[str, float]:
  """{name: median seconds of its timed calls} of `time_in_turns`."""
  _, times = time_in_turns(runs, repeats)
  return {name: statistics.median(values) for name, values in times.items()}
