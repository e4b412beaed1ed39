r"""Reset-variant evaluation: vmapped chunks against one variant at a time.

The analysis pass evaluates the trained model and every reset variant of it
(units x (taus + seeds)). This benchmark builds such variants of a randomly
initialized model (each unit reset, in turn, to one of several fresh
initializations), and evaluates all of them on the same random batches:
  * one at a time: the jitted single-variant eval step, looped over variants;
  * vectorized: variants stacked on a leading axis, jit(vmap(eval step)),
    `variants_per_call` per call (the last chunk padded), the front end passed
    unbatched to chunks that do not reset it (as the analysis pass does).
Both in the same process, with the same batches and the same host-side WER
scoring. "compile s" is the first call's extra time (compilation); "eval s" is
the median over repeats of a full evaluation of all variants after that; the
ratio is one-at-a-time eval s / this row's eval s. The rows also check that
both paths give the same losses.

  XLA_FLAGS=--xla_force_host_platform_device_count=1 \
    .venv/bin/python benchmarks/analysis_vectorized.py
  .venv/bin/python benchmarks/analysis_vectorized.py --size=demo \
      --variants_per_call=8,16 --num_sources=3
Flags are absl flags (`--help` lists them); a bad one ends the run with one
line `error: ...`, exit status 1.
"""

import statistics
import time

from absl import flags
import jax
import numpy as np

from conformer_fl import cli
from conformer_fl import models
from conformer_fl.analysis import importance
from conformer_fl.analysis import resets
from conformer_fl.analysis import variant_eval


def make_variants(model, num_sources: int, granularity: str):
  """As the analysis orders them: the model (seed 0), then per unit, the unit
  reset to each of `num_sources` other initializations (seeds 1, 2, ...)."""
  seeds = list(range(1, num_sources + 1))
  inits = importance.fresh_initializations(model, [0] + seeds)
  units = models.list_units(inits[0]["params"], granularity)
  variants = resets.make_variants(list(units), taus=[], seeds=seeds)
  groups = variant_eval.shareable_groups([units.get(v.unit) for v in variants])
  return [resets.variant_variables(v, inits[0], {}, inits, units)
          for v in variants], groups


def make_batches(num_batches: int, batch_size: int, seconds: float,
                 vocab_size: int, label_length: int = 32):
  rng = np.random.default_rng(0)
  samples = int(16000 * seconds)
  return [dict(
      audio=(0.1 * rng.normal(size=(batch_size, samples))).astype(np.float32),
      audio_paddings=np.zeros((batch_size, samples), np.float32),
      labels=rng.integers(1, vocab_size, (batch_size, label_length)).astype(
          np.int32),
      label_paddings=np.zeros((batch_size, label_length), np.float32),
      example_mask=np.ones((batch_size,), np.float32),
  ) for _ in range(num_batches)]


def _decode(ids):
  return " ".join(f"w{i}" for i in ids)


def time_evaluation(run, repeats: int):
  """(compile seconds, median eval seconds, results) of run()."""
  start = time.perf_counter()
  results = run()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  steady = statistics.median(times)
  return max(first - steady, 0.0), steady, results


def define_flags(flag_values: flags.FlagValues) -> None:
  """The benchmark's flags (absl)."""
  f = flag_values
  flags.DEFINE_string("size", "tiny", "Model size.", flag_values=f)
  flags.DEFINE_string("granularity", "module", "Analysis units.",
                      flag_values=f)
  flags.DEFINE_integer("num_sources", 2,
                       "Reset sources per unit (taus + seeds).", flag_values=f)
  flags.DEFINE_list("variants_per_call", "5,25",
                    "Comma-separated chunk sizes, one row each.", flag_values=f)
  flags.DEFINE_integer("num_batches", 2, "Eval batches.", flag_values=f)
  flags.DEFINE_integer("batch_size", 8, "Utterances per batch.", flag_values=f)
  flags.DEFINE_float("seconds", 4.0, "Utterance length in seconds.",
                     flag_values=f)
  flags.DEFINE_integer("repeats", 2, "Timed evaluations after the first.",
                       flag_values=f)


def main(command_line: cli.ScriptArgs) -> None:
  args = command_line.flags
  config = models.get_model_config(args.size, conv_norm="batch_norm")
  model = models.build_model(config)
  variants, groups = make_variants(model, args.num_sources, args.granularity)
  batches = make_batches(args.num_batches, args.batch_size, args.seconds,
                         config.vocab_size)
  print(f"size={args.size} variants={len(variants)} "
        f"batches={args.num_batches}x{args.batch_size}x{args.seconds}s "
        f"devices={jax.device_count()} ({jax.devices()[0].platform})")

  single = variant_eval.make_single_eval_fn(model)
  compile_s, loop_s, loop_results = time_evaluation(
      lambda: variant_eval.evaluate_one_at_a_time(
          single, variants.__getitem__, len(variants), batches, _decode),
      args.repeats)
  rows = [("one at a time", 1, compile_s, loop_s, 0.0)]
  for per_call in [int(v) for v in args.variants_per_call]:
    vectorized = variant_eval.make_vectorized_eval_fn(model)
    compile_s, eval_s, results = time_evaluation(
        lambda: variant_eval.evaluate_vectorized(
            vectorized, variants.__getitem__, len(variants), batches, _decode,
            per_call, groups), args.repeats)
    max_diff = max(abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-9)
                   for a, b in zip(results, loop_results))
    rows.append(("vmapped", per_call, compile_s, eval_s, max_diff))

  print(f"\n| method | variants/call | compile s | eval s | variants/s | "
        f"ratio vs one at a time | max rel. loss diff |")
  print("|---|---|---|---|---|---|---|")
  for method, per_call, compile_s, eval_s, diff in rows:
    print(f"| {method} | {per_call} | {compile_s:.1f} | {eval_s:.2f} | "
          f"{len(variants) / eval_s:.1f} | {loop_s / eval_s:.2f}x | "
          f"{diff:.1e} |")


if __name__ == "__main__":
  cli.run_script(main, define_flags)
