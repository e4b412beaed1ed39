r"""Clients per second of a round with capacity tiers against a single tier.

Both rounds are the run's own (`steps.make_round_from_config` of
configs/federated.py): the same clients (the same random audio and labels
[C, K, B, ...]), the same rng and the same optimizers. They differ only in
`federated.dropout.tiers`:
  tiered  `--tiers` (default 3 tiers: 1/3 of the clients at full width, 1/3
          at width 0.75, 1/3 at width 0.5 of the layers of `--unit_kinds`),
          each tier vmapped at its own static widths inside the one compiled
          round (conformer_fl/federated/tiers.py), units chosen by
          `--policy`;
  single  every client at full width, one vmap (no dropout).
Each is compiled and run once (warm-up), then both are timed in turns
(single, tiered, single, tiered, ...) `--repeats` times; printed: the median
round time of each, clients per second (C / median) and the ratio
tiered / single of clients per second.

The module imports without TensorFlow (tests/test_light_install.py); running
it needs the full install, since the run's round builder (conformer_fl/steps.py)
imports the input pipeline. Run with the devices set before jax starts,
e.g.:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
      nice python benchmarks/tiered_round.py --size=demo8x64 --clients=12 \
      --local_steps=2 --batch=2 --audio_seconds=1 --repeats=5

With 4 devices each tier's clients must be a multiple of 4: 12 clients give
4 per tier (8 clients would allow 2 tiers only). Absolute times on a CPU
host say nothing about an accelerator; the ratio is the figure. A tier at
width w trains about w^2 of the thinned layers' FLOPs, but the front end,
attention scores and the server's mean do not shrink, and each tier is a
vmap of its own in the compiled round. The first call of each round
(compile and run) is printed beside the medians.

With the command above on a 2-core CPU host the tiered round (static
policy) does about 0.8x the clients per second of the single-tier round,
and its first call (compile and run) takes several times as long: there the
three tiers' separate vmaps cost more than their thinner layers save.
"""

from collections.abc import Sequence
import functools
import os
import statistics
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # `python benchmarks/X.py` finds benchmarks/.
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import timing
# pylint: enable=g-import-not-at-top,wrong-import-position

_SIZE = flags.DEFINE_string("size", "demo8x64", "Model size "
                            "(conformer_fl/models/sizes.py).")
_CLIENTS = flags.DEFINE_integer("clients", 12, "Clients per round: each "
                                "tier's share a multiple of the devices.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Devices of the mesh (0 = all"
                                " of jax's).")
_LOCAL_STEPS = flags.DEFINE_integer("local_steps", 2, "Local steps K.")
_BATCH = flags.DEFINE_integer("batch", 2, "Client batch B.")
_AUDIO_SECONDS = flags.DEFINE_float("audio_seconds", 1.0, "Utterance length.")
_LABEL_LENGTH = flags.DEFINE_integer("label_length", 8, "Labels per utterance.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed turns of each round.")
_TIERS = flags.DEFINE_string(
    "tiers", "0.333333:1.0,0.333333:0.75,0.333334:0.5",
    "The tiered round's federated.dropout.tiers as fraction:width,...")
_POLICY = flags.DEFINE_enum("policy", "static",
                            ["random", "ordered", "static", "rolling"],
                            "Which units a thinned client keeps.")
_UNIT_KINDS = flags.DEFINE_list("unit_kinds", ["ffn", "conv"],
                                "Kinds of layers the tiers thin.")


def parse_tiers(text: str) -> tuple[tuple[float, float], ...]:
  """'0.5:1.0,0.5:0.5' -> ((0.5, 1.0), (0.5, 0.5))."""
  try:
    return tuple((float(fraction), float(width)) for fraction, width in (
        item.split(":") for item in text.split(",")))
  except ValueError as e:
    raise app.UsageError(f"--tiers={text!r}: expected fraction:width,... such"
                         " as 0.5:1.0,0.5:0.5.") from e


def round_config(tiers: Sequence[tuple[float, float]]) -> Any:
  """configs/federated.py at --size, with the benchmark's round fields."""
  # pylint: disable=g-import-not-at-top
  from conformer_fl import cli
  from conformer_fl.data import tokenizer
  # pylint: enable=g-import-not-at-top
  config = cli.load_config_file(
      f"{os.path.join(ROOT, 'configs', 'federated.py')}:size={_SIZE.value}")
  config = config.copy_and_resolve_references()
  config.model.vocab_size = tokenizer.CharTokenizer().vocab_size
  f = config.federated
  f.clients_per_round = _CLIENTS.value
  f.local_steps = _LOCAL_STEPS.value
  f.client_batch_size = _BATCH.value
  f.dropout.tiers = tuple(tiers)
  f.dropout.policy = _POLICY.value
  f.dropout.unit_kinds = tuple(_UNIT_KINDS.value)
  return config


def round_data(config: Any, seed: int = 0) -> Any:
  """RoundData of random audio and labels [C, K, B, ...] of every client,
  all real."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  c, k, b = _CLIENTS.value, _LOCAL_STEPS.value, _BATCH.value
  batches = timing.random_asr_batches(
      np.random.default_rng(seed), (c, k, b),
      int(_AUDIO_SECONDS.value * 16000), _LABEL_LENGTH.value,
      config.model.vocab_size)
  return timing.all_real_round(batches, c, k, b)


def _step(round_fn: Any, states: dict[str, Any], name: str,
          data: Any) -> Any:
  """One round from states[name] (donated), which the new state replaces."""
  import jax  # pylint: disable=g-import-not-at-top
  states[name], metrics = round_fn(states[name], data, jax.random.key(1))
  return metrics


def measure(tiers: Sequence[tuple[float, float]]) -> dict[str, Any]:
  """Median round seconds and clients per second of the single and tiered
  rounds, timed in turns after one warm-up call each."""
  # pylint: disable=g-import-not-at-top
  import jax
  from conformer_fl import models
  from conformer_fl import steps
  from conformer_fl.federated import mesh as mesh_lib
  from conformer_fl.federated import fl_round as round_lib
  # pylint: enable=g-import-not-at-top
  mesh = mesh_lib.make_client_mesh(_DEVICES.value or jax.device_count())
  data = None
  runs, states = {}, {}
  for name, round_tiers in (("single", ()), ("tiered", tiers)):
    config = round_config(round_tiers)
    model = models.build_model(config.model)
    params, model_state = models.split_variables(
        models.init_variables(model, config.seed))
    round_fn, server_optimizer = steps.make_round_from_config(
        config, model, params, model_state, mesh)
    # State and data placed on the mesh as the round returns and reads them,
    # so that the first call compiles what every later call runs.
    states[name] = mesh_lib.replicate(
        round_lib.init_server_state(params, model_state, server_optimizer),
        mesh)
    if data is None:
      data = mesh_lib.shard_round_data(round_data(config), mesh)
    runs[name] = functools.partial(_step, round_fn, states, name, data)
  compile_seconds, times = timing.time_in_turns(runs, _REPEATS.value)
  for name, seconds in compile_seconds.items():
    logging.info("%s round: first call (compile and run) %.1f s", name,
                 seconds)
  result = {"devices": mesh.size, "clients": _CLIENTS.value}
  for name, values in times.items():
    median = statistics.median(values)
    result[name] = dict(median_seconds=median,
                        clients_per_second=_CLIENTS.value / median,
                        first_call_seconds=compile_seconds[name],
                        seconds=values)
  result["ratio"] = (result["tiered"]["clients_per_second"]
                     / result["single"]["clients_per_second"])
  return result


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  tiers = parse_tiers(_TIERS.value)
  result = measure(tiers)
  print(f"{_SIZE.value}, {result['clients']} clients on {result['devices']}"
        f" devices, K={_LOCAL_STEPS.value}, B={_BATCH.value},"
        f" {_AUDIO_SECONDS.value:g} s, median of {_REPEATS.value} turns")
  for name, label in (("single", "single tier (all full width)"),
                      ("tiered", f"tiered {_TIERS.value} ({_POLICY.value})")):
    r = result[name]
    print(f"  {label}: {r['median_seconds']:.3f} s/round,"
          f" {r['clients_per_second']:.2f} clients/s (first call"
          f" {r['first_call_seconds']:.1f} s)")
  print(f"  ratio tiered / single clients/s: {result['ratio']:.2f}")


if __name__ == "__main__":
  app.run(main)
