r"""Forward+backward time per utterance of the Conformer, alone and vmapped.

For each model size and depthwise-conv implementation ('shift_add', 'conv')
it times, in a fresh process per case, one jit-compiled gradient step of the mean per-example loss (train
mode: dropout and SpecAugment on):
  * alone: one parameter set, one batch;
  * vmap xN: N stacked parameter sets, each with its own batch (as clients of
    a federated round are run).
Times are medians over repeats after a warm-up call (compile excluded), with
block_until_ready. In the same process, just before each case, a float32
matmul measures the machine's GFLOP/s, and model FLOP utilization (MFU) =
compiled step FLOPs (XLA's cost_analysis) / step time / matmul FLOP/s. Ratios compare the time per
utterance with the 'shift_add, alone' row of the same size.

Quick default (tiny and S, batch 4, 2 s utterances, 3 repeats):
  XLA_FLAGS=--xla_force_host_platform_device_count=1 \
    .venv/bin/python benchmarks/model_step.py
Flags are absl flags (`--help` lists them); a bad one ends the run with one
line `error: ...`, exit status 1.
"""

import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from conformer_fl import cli
from conformer_fl import models


def _time_call(fn: Callable[[], Any], repeats: int,
               slow_seconds: float) -> tuple[float, int]:
  """Median seconds of fn() after one warm-up; 1 repeat if the warm-up is slow.

  The warm-up call (which compiles) is excluded from the timing.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn())
  if time.perf_counter() - start > slow_seconds:
    repeats = 1
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), repeats


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def matmul_gflops(size: int, repeats: int) -> float:
  """GFLOP/s of a float32 [size, size] @ [size, size] matmul."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  seconds, _ = _time_call(lambda: matmul(a, b), max(repeats, 5), 1e9)
  return 2.0 * size**3 / seconds / 1e9


def make_batch(seed: int, batch_size: int, seconds: float, label_length: int,
               vocab_size: int) -> dict[str, np.ndarray]:
  """Random audio in [-0.5, 0.5], the last example half padded."""
  rng = np.random.default_rng(seed)
  samples = int(16000 * seconds)
  audio_paddings = np.zeros((batch_size, samples), np.float32)
  audio_paddings[-1, samples // 2:] = 1.0
  return {
      "audio": rng.uniform(-0.5, 0.5, (batch_size, samples)).astype(
          np.float32),
      "audio_paddings": audio_paddings,
      "labels": rng.integers(1, vocab_size, (batch_size, label_length)).astype(
          np.int32),
      "label_paddings": np.zeros((batch_size, label_length), np.float32),
  }


def benchmark_case(size: str, impl: str, num_sets: int,
                   args: flags.FlagValues) -> dict[str, Any]:
  """Times one (size, impl, num_sets) case; num_sets=1 means no vmap."""
  config = models.get_model_config(size, depthwise_impl=impl,
                                   decoder=args.decoder,
                                   conv_norm="group_norm", conv_norm_groups=1)
  model = models.build_model(config)
  batches = [make_batch(seed, args.batch_size, args.seconds,
                        args.label_length, config.vocab_size)
             for seed in range(num_sets)]

  def init(rng):
    b = batches[0]
    return model.init(rng, b["audio"], b["audio_paddings"], b["labels"],
                      b["label_paddings"], train=False)["params"]

  def grad_step(params, batch, rng):
    loss_fn = lambda p: jnp.mean(models.per_example_loss(
        model, {"params": p}, batch, train=True, rng=rng)[0])
    return jax.value_and_grad(loss_fn)(params)

  keys = jax.random.split(jax.random.key(0), num_sets)
  if num_sets == 1:
    params = jax.jit(init)(keys[0])
    inputs = (params, batches[0], keys[0])
    step = jax.jit(grad_step)
  else:
    # Not jax.vmap(init): a batched QR (the LSTM's orthogonal init) can
    # deadlock jaxlib 0.10's LAPACK kernel on a 2-thread pool.
    single_init = jax.jit(init)
    params = jax.tree.map(lambda *xs: jnp.stack(xs),
                          *[single_init(key) for key in keys])
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
    inputs = (params, stacked, keys)
    step = jax.jit(jax.vmap(grad_step))
  matmul = matmul_gflops(args.matmul_size, args.repeats)
  start = time.perf_counter()
  compiled = step.lower(*inputs).compile()
  compile_seconds = time.perf_counter() - start
  seconds, repeats = _time_call(lambda: compiled(*inputs), args.repeats,
                                args.slow_seconds)
  num_params = sum(x.size for x in jax.tree.leaves(params)) // num_sets
  return {
      "size": size, "impl": impl, "num_sets": num_sets, "seconds": seconds,
      "per_utt_ms": 1e3 * seconds / (num_sets * args.batch_size),
      "flops": _flops(compiled), "repeats": repeats,
      "compile_s": compile_seconds, "params": num_params,
      "matmul_gflops": matmul,
  }


def run_case_in_subprocess(size: str, impl: str, num_sets: int,
                           argv: list[str],
                           timeout: float) -> tuple[dict[str, Any], str]:
  """Runs one case in a fresh process; retries once if it times out.

  A fresh process per case keeps memory and compile caches apart; the retry
  guards against an intermittent XLA:CPU hang (every thread waiting on a
  futex inside block_until_ready).
  """
  command = [sys.executable, __file__, *argv,
             f"--case={size},{impl},{num_sets}"]
  for attempt in (1, 2):
    try:
      done = subprocess.run(command, capture_output=True, text=True,
                            timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
      print(f"  ({size}, {impl}, {num_sets}) timed out after {timeout:.0f} s "
            f"(attempt {attempt})", flush=True)
      continue
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return row, "" if attempt == 1 else " (retried)"
  raise RuntimeError(f"Case ({size}, {impl}, {num_sets}) timed out twice.")


def define_flags(flag_values: flags.FlagValues) -> None:
  """The benchmark's flags (absl)."""
  f = flag_values
  flags.DEFINE_list("sizes", "tiny,S", "Comma-separated model sizes.",
                    flag_values=f)
  flags.DEFINE_list("impls", "shift_add,conv",
                    "Comma-separated depthwise-conv implementations.",
                    flag_values=f)
  flags.DEFINE_integer("num_sets", 8, "Parameter sets in the vmapped case.",
                       flag_values=f)
  flags.DEFINE_integer("batch_size", 4, "Utterances per batch.",
                       flag_values=f)
  flags.DEFINE_float("seconds", 2.0, "Utterance length in seconds.",
                     flag_values=f)
  flags.DEFINE_integer("label_length", 16, "Labels per utterance.",
                       flag_values=f)
  flags.DEFINE_enum("decoder", "rnnt", ["rnnt", "ctc"], "Model decoder.",
                    flag_values=f)
  flags.DEFINE_integer("repeats", 3, "Timed calls after the warm-up.",
                       flag_values=f)
  flags.DEFINE_float("slow_seconds", 60.0,
                     "A warm-up slower than this caps repeats to 1.",
                     flag_values=f)
  flags.DEFINE_integer("matmul_size", 1024, "N of the N x N reference matmul.",
                       flag_values=f)
  flags.DEFINE_float("case_timeout", 1200.0,
                     "Seconds before a case is retried.", flag_values=f)
  flags.DEFINE_string("case", None, "Internal: run one 'size,impl,num_sets'"
                      " case and print it as JSON.", flag_values=f)


def main(command_line: cli.ScriptArgs) -> None:
  args = command_line.flags
  if args.case:
    size, impl, num_sets = args.case.split(",")
    print(json.dumps(benchmark_case(size, impl, int(num_sets), args)))
    return

  print(f"jax {jax.__version__}, devices {jax.devices()}")
  print(f"batch {args.batch_size} x {args.seconds} s utterances, labels "
        f"{args.label_length}, decoder {args.decoder}, conv_norm group_norm, "
        f"train mode, value_and_grad of the mean per-example loss; one "
        f"process per case")
  print(f"float32 matmul {args.matmul_size}^3 GFLOP/s at the start: "
        f"{matmul_gflops(args.matmul_size, args.repeats):.1f}; each case "
        "re-measures it just before its compile (column matmul/s), since the "
        "machine is shared, and MFU uses that.\n")

  header = (f"{'size':<5} {'impl':<10} {'sets':>4} {'params':>11} "
            f"{'compile s':>9} {'step s':>8} {'ms/utt':>8} {'vs base':>7} "
            f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'matmul/s':>9} {'MFU':>6} "
            f"{'reps':>4}")
  print(header)
  print("-" * len(header), flush=True)
  argv = [arg for arg in command_line.argv if not arg.startswith("--case=")]
  for size in args.sizes:
    baseline = None
    for impl in args.impls:
      for num_sets in (1, args.num_sets):
        row, note = run_case_in_subprocess(size, impl, num_sets, argv,
                                           args.case_timeout)
        if baseline is None:
          baseline = row["per_utt_ms"]
        achieved = row["flops"] / row["seconds"] / 1e9
        ratio = row["per_utt_ms"] / baseline
        print(f"{size:<5} {impl:<10} {num_sets:>4} {row['params']:>11,} "
              f"{row['compile_s']:>9.1f} {row['seconds']:>8.3f} "
              f"{row['per_utt_ms']:>8.2f} {ratio:>6.2f}x "
              f"{row['flops'] / 1e9:>10.2f} {achieved:>8.1f} "
              f"{row['matmul_gflops']:>9.1f} "
              f"{achieved / row['matmul_gflops']:>6.1%} "
              f"{row['repeats']:>4}{note}",
              flush=True)


if __name__ == "__main__":
  cli.run_script(main, define_flags)
