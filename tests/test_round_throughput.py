"""benchmarks/round_throughput.py measures what it says, on the toy model.

One worker runs in this process on the 4 CPU devices of tests/conftest.py.
"""

import numpy as np

from benchmarks import round_throughput

CLIENTS, LOCAL_STEPS, BATCH = 8, 2, 4


def test_worker_times_two_implementations_of_one_round():
  args = round_throughput.parse_args([
      "--model=toy", f"--clients={CLIENTS}", f"--local_steps={LOCAL_STEPS}",
      f"--batch={BATCH}", "--repeats=1", "--toy_dim=16", "--toy_hidden=32",
      "--matmul_size=256", "--worker_devices=4"])
  result = round_throughput.run_worker(args)

  # The compiled round and the loop end at the same server parameters, and
  # those moved away from the initial ones.
  assert result["max_param_difference"] < 1e-6
  assert result["max_param_change"] > 1e-3

  client_steps = CLIENTS * LOCAL_STEPS
  np.testing.assert_allclose(
      result["compiled_client_steps_per_s"],
      client_steps / result["compiled_round_s"])
  np.testing.assert_allclose(
      result["speedup_vs_loop"],
      result["loop_round_s"] / result["compiled_round_s"])
  np.testing.assert_allclose(
      result["batching_ceiling"],
      result["loop_round_s"] / result["merged_client_s"])
  # XLA counts at least the loop's FLOPs for the compiled round: the same
  # local steps, plus the aggregation and the server step.
  assert result["compiled_xla_gflop"] >= result["loop_xla_gflop"] > 0
