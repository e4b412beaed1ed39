r"""Throughput of the compiled federated round against a per-client Python loop.

For each device count (a subprocess each, since XLA_FLAGS must be set before
jax is imported) this measures, in the same process, timing compiled and
loop (and merged) in turns so that drift in the machine's load hits all
alike:
  compiled  `make_federated_round`: all clients vmapped and sharded over the
            'clients' mesh axis, aggregation and server step in one jit.
  loop      the fedjax-style baseline: a Python loop over clients calling a
            jitted per-client update (K local steps under lax.scan) on one
            device, a jitted weighted accumulation, then a jitted server step.
  merged    one jitted client update whose batch holds every client's
            examples ([K, C * B]): the same work with the batching a vmap
            over clients could at best bring. 'batching ceiling' = loop /
            merged; near 1x, one client's step already keeps the cores busy
            and the compiled round can only save dispatch and host trips.
  matmul    a float32 [N, N] x [N, N] matmul, the machine's reference peak
            (XLA:CPU uses every core for one device's matmul, so this is the
            peak of the whole machine, not of one forced host device).
Both sides use the optimizers of configs/federated.py (client SGD with
gradient clipping, FedAvg server) and must end at the same server parameters
(the largest difference is printed).
Model FLOP utilization = (FLOPs of one local step, from XLA's cost analysis of
the jitted loss gradient, x client steps) / round time / matmul FLOP/s.
Also printed: XLA's cost analysis (FLOPs, bytes accessed) of the compiled
round and of the loop's per-client update, and how long each took to compile.

Usage:
  python benchmarks/round_throughput.py --model=toy
  python benchmarks/round_throughput.py --model=tiny --clients=4 \
      --local_steps=2 --batch=2 --devices=1,2,4
'toy' is a 2-layer MLP regression. 'tiny' / 'S' build the Conformer of
conformer_fl.models and feed it random audio and labels.

Flags are absl flags (`--help` lists them); a bad one ends the run with one
line `error: ...`, exit status 1.
"""

from collections.abc import Sequence
import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # `python benchmarks/X.py` finds benchmarks/.
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import timing
from conformer_fl import cli
# pylint: enable=g-import-not-at-top,wrong-import-position

RESULT_PREFIX = "RESULT "


def define_flags(flag_values: flags.FlagValues) -> None:
  """The benchmark's flags (absl)."""
  f = flag_values
  flags.DEFINE_enum("model", "toy", ["toy", "tiny", "S"],
                    "toy: a 2-layer MLP; tiny, S: the Conformer.",
                    flag_values=f)
  flags.DEFINE_list("devices", "1,2,4",
                    "Comma-separated device counts (a subprocess each).",
                    flag_values=f)
  flags.DEFINE_integer("clients", 8,
                       "Clients per round (a multiple of every count).",
                       flag_values=f)
  flags.DEFINE_integer("local_steps", 4, "Client steps per round.",
                       flag_values=f)
  flags.DEFINE_integer("batch", 16, "Examples per client step.",
                       flag_values=f)
  flags.DEFINE_integer("repeats", 3, "Timed calls of each side.",
                       flag_values=f)
  flags.DEFINE_integer("toy_dim", 256, "Input width of the toy model.",
                       flag_values=f)
  flags.DEFINE_integer("toy_hidden", 512, "Hidden width of the toy model.",
                       flag_values=f)
  flags.DEFINE_float("audio_seconds", 2.0, "Utterance length (tiny, S).",
                     flag_values=f)
  flags.DEFINE_integer("label_length", 16, "Labels per utterance (tiny, S).",
                       flag_values=f)
  flags.DEFINE_integer("matmul_size", 1024,
                       "N of the N x N reference matmul.", flag_values=f)
  flags.DEFINE_integer("worker_devices", 0,
                       "Internal: run one measurement in this process.",
                       flag_values=f)


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """The flags of `argv` (no program name), parsed in a FlagValues of their
  own, for a caller in this process."""
  return cli.parse_script_flags(["round_throughput.py", *argv],
                                define_flags).flags


# ----------------------------------------------------------------- models


def toy_problem(args, rng_seed: int = 0):
  """(loss_fn, params, model_state, make_client_batches) for the MLP."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  d, h = args.toy_dim, args.toy_hidden
  key_1, key_2 = jax.random.split(jax.random.key(rng_seed))
  params = {
      "hidden": {"w": jax.random.normal(key_1, (d, h)) / np.sqrt(d),
                 "b": jnp.zeros((h,))},
      "out": {"w": jax.random.normal(key_2, (h,)) / np.sqrt(h),
              "b": jnp.zeros(())},
  }

  def loss_fn(params, model_state, batch, rng):
    del rng
    hidden = jax.nn.relu(batch["x"] @ params["hidden"]["w"]
                         + params["hidden"]["b"])
    prediction = hidden @ params["out"]["w"] + params["out"]["b"]
    mask = batch["example_mask"]
    squared = jnp.where(mask > 0, (prediction - batch["y"]) ** 2, 0.0)
    return jnp.sum(squared) / jnp.maximum(jnp.sum(mask), 1.0), model_state

  def make_batches(rng: np.random.Generator, shape: tuple[int, ...]):
    x = rng.normal(size=shape + (d,)).astype(np.float32)
    return {"x": x, "y": np.tanh(x[..., 0]).astype(np.float32)}

  return loss_fn, params, {}, make_batches


def asr_problem(args, rng_seed: int = 0):
  """(loss_fn, params, model_state, make_client_batches) for a Conformer."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from conformer_fl import models  # pylint: disable=g-import-not-at-top

  config = models.get_model_config(args.model)
  model = models.build_model(config)
  num_samples = int(args.audio_seconds * 16000)

  def make_batches(rng: np.random.Generator, shape: tuple[int, ...]):
    return timing.random_asr_batches(rng, shape, num_samples,
                                     args.label_length, config.vocab_size)

  init_batch = make_batches(np.random.default_rng(rng_seed), (1,))
  variables = model.init(
      {"params": jax.random.key(rng_seed)}, init_batch["audio"],
      init_batch["audio_paddings"], init_batch["labels"],
      init_batch["label_paddings"], train=False)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(params, model_state, batch, rng):
    losses, new_model_state = models.per_example_loss(
        model, {"params": params, **model_state}, batch, train=True, rng=rng)
    mask = batch["example_mask"]
    loss = (jnp.sum(jnp.where(mask > 0, losses, 0.0))
            / jnp.maximum(jnp.sum(mask), 1.0))
    return loss, new_model_state

  return loss_fn, params, model_state, make_batches


# ----------------------------------------------------------------- worker


def run_worker(args) -> dict[str, Any]:
  """One measurement on `args.worker_devices` devices (XLA_FLAGS set)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from conformer_fl import config_lib
  from conformer_fl import optimizers
  from conformer_fl.federated import mesh as mesh_lib
  from conformer_fl.federated import fl_round as round_lib
  # pylint: enable=g-import-not-at-top

  num_devices = args.worker_devices
  if jax.device_count() < num_devices:
    raise RuntimeError(f"Asked for {num_devices} devices, jax has"
                       f" {jax.device_count()}.")
  make_problem = toy_problem if args.model == "toy" else asr_problem
  loss_fn, params, model_state, make_batches = make_problem(args)
  c, k, b = args.clients, args.local_steps, args.batch
  rng = np.random.default_rng(0)
  round_data = timing.all_real_round(make_batches(rng, (c, k, b)), c, k, b)
  batches = round_data.batches  # [C, K, B, ...], with 'example_mask'.
  # The optimizers of configs/federated.py: SGD with per-step gradient
  # clipping on the clients, FedAvg on the server.
  federated = config_lib.federated_config()
  client_optimizer = optimizers.client_optimizer_from_config(
      federated.client_optimizer)
  server_optimizer = optimizers.server_optimizer_from_config(
      federated.server_optimizer)
  rng_key = jax.random.key(0)

  # Compiled, sharded round. The state is donated, so each call gets a copy.
  mesh = mesh_lib.make_client_mesh(num_devices)
  round_fn = round_lib.make_federated_round(loss_fn, client_optimizer,
                                            server_optimizer, mesh)
  server_state = mesh_lib.replicate(
      round_lib.init_server_state(params, model_state, server_optimizer),
      mesh)
  sharded_data = mesh_lib.shard_round_data(round_data, mesh)
  copy_state = jax.jit(lambda s: jax.tree.map(jnp.copy, s))
  # Compiled ahead of time, once: the same executable is timed and analysed.
  start = time.perf_counter()
  round_executable = round_fn.jitted.lower(
      copy_state(server_state), sharded_data, rng_key).compile()
  compiled_compile_seconds = time.perf_counter() - start

  def compiled_round():
    return round_executable(copy_state(server_state), sharded_data, rng_key)[0]

  # Baseline: Python loop over clients of a jitted per-client update.
  client_inputs = [
      ({key: value[i] for key, value in batches.items()},
       round_data.step_mask[i]) for i in range(c)]
  jitted_client_update = jax.jit(
      functools.partial(round_lib.client_update, loss_fn=loss_fn,
                        client_optimizer=client_optimizer))
  start = time.perf_counter()
  client_update = jitted_client_update.lower(
      params, model_state, *client_inputs[0], rng_key).compile()
  loop_compile_seconds = time.perf_counter() - start
  accumulate = jax.jit(lambda total, delta, w: jax.tree.map(
      lambda t, d: t + w * d, total, delta))
  opt_state = server_optimizer.init(params)

  @jax.jit
  def server_step(params, opt_state, delta_sum, weight_sum):
    pseudo_gradient = jax.tree.map(lambda d: -d / weight_sum, delta_sum)
    updates, opt_state = server_optimizer.update(pseudo_gradient, opt_state,
                                                 params)
    return optax.apply_updates(params, updates), opt_state

  def loop_round():
    delta_sum = jax.tree.map(jnp.zeros_like, params)
    round_rng = jax.random.fold_in(rng_key, 0)
    for i, (client_batches, step_mask) in enumerate(client_inputs):
      delta, *_ = client_update(params, model_state, client_batches, step_mask,
                                jax.random.fold_in(round_rng, i))
      delta_sum = accumulate(delta_sum, delta, round_data.num_examples[i])
    return server_step(params, opt_state, delta_sum,
                       float(round_data.num_examples.sum()))

  # The ceiling of what batching clients can save: one client whose batch
  # holds every client's examples ([K, C * B]), one call, same work. If the
  # loop is not much slower than this, one client's step is already
  # throughput-bound and no vmap over clients can beat the loop by much.
  merged_batches = {
      key: np.swapaxes(value, 0, 1).reshape((k, c * b) + value.shape[3:])
      for key, value in batches.items()}
  all_steps = np.ones((k,), np.float32)
  merged_update = jitted_client_update.lower(
      params, model_state, merged_batches, all_steps, rng_key).compile()

  def one_merged_client():
    return merged_update(params, model_state, merged_batches, all_steps,
                         rng_key)[0]

  # Both sides must compute the same round: same rngs, same server step.
  compiled_params = jax.device_get(compiled_round().params)
  loop_params = jax.device_get(loop_round()[0])
  max_param_difference = max(
      float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree.leaves(compiled_params), jax.tree.leaves(loop_params)))
  max_param_change = max(
      float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(
          jax.tree.leaves(compiled_params), jax.tree.leaves(params)))

  seconds = timing.median_seconds_in_turns(
      {"compiled": compiled_round, "loop": loop_round,
       "merged": one_merged_client}, args.repeats)
  compiled_seconds, loop_seconds = seconds["compiled"], seconds["loop"]

  # FLOPs of one local step (loss + gradient) from XLA's cost analysis.
  one_batch = {key: value[0, 0] for key, value in batches.items()}
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  cost = grad_fn.lower(params, model_state, one_batch,
                       rng_key).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  step_flops = float(cost.get("flops", float("nan")))

  # What XLA compiled for each side: FLOPs and bytes accessed of one round.
  # The round is one SPMD program per device (its clients / devices), the
  # loop C calls of the per-client update.
  def xla_cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return (float(cost.get("flops", float("nan"))),
            float(cost.get("bytes accessed", float("nan"))))

  round_xla = xla_cost(round_executable)
  client_xla = xla_cost(client_update)

  n = args.matmul_size
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul_seconds = timing.median_seconds_in_turns(
      {"matmul": lambda: matmul(a)}, max(args.repeats, 5))["matmul"]
  matmul_flops_per_second = 2 * n ** 3 / matmul_seconds

  client_steps = c * k
  round_flops = step_flops * client_steps
  param_count = sum(x.size for x in jax.tree.leaves(params))
  return {
      "model": args.model,
      "devices": num_devices,
      "clients": c,
      "local_steps": k,
      "batch": b,
      "params": int(param_count),
      "compiled_compile_s": compiled_compile_seconds,
      "loop_compile_s": loop_compile_seconds,
      "compiled_round_s": compiled_seconds,
      "loop_round_s": loop_seconds,
      "compiled_client_steps_per_s": client_steps / compiled_seconds,
      "loop_client_steps_per_s": client_steps / loop_seconds,
      "max_param_difference": max_param_difference,
      "max_param_change": max_param_change,
      "speedup_vs_loop": loop_seconds / compiled_seconds,
      "merged_client_s": seconds["merged"],
      "batching_ceiling": loop_seconds / seconds["merged"],
      "step_gflop": step_flops / 1e9,
      "matmul_gflop_per_s": matmul_flops_per_second / 1e9,
      "compiled_gflop_per_s": round_flops / compiled_seconds / 1e9,
      "compiled_mfu": round_flops / compiled_seconds / matmul_flops_per_second,
      "loop_mfu": round_flops / loop_seconds / matmul_flops_per_second,
      "compiled_xla_gflop": num_devices * round_xla[0] / 1e9,
      "loop_xla_gflop": c * client_xla[0] / 1e9,
      "compiled_xla_gbytes": num_devices * round_xla[1] / 1e9,
      "loop_xla_gbytes": c * client_xla[1] / 1e9,
  }


# ----------------------------------------------------------------- driver


def _subprocess_env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  xla_flags.append(f"--xla_force_host_platform_device_count={num_devices}")
  env["XLA_FLAGS"] = " ".join(xla_flags)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env


def run_device_count(num_devices: int, argv: list[str]) -> dict[str, Any]:
  command = [sys.executable, os.path.abspath(__file__), *argv,
             f"--worker_devices={num_devices}"]
  completed = subprocess.run(command, env=_subprocess_env(num_devices),
                             capture_output=True, text=True, check=False)
  for line in completed.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(f"Worker with {num_devices} devices failed"
                     f" (exit {completed.returncode}):\n{completed.stderr}")


def print_table(results: list[dict[str, Any]]) -> None:
  first = results[0]
  print(f"model={first['model']} params={first['params']:,}"
        f" clients={first['clients']} local_steps={first['local_steps']}"
        f" batch={first['batch']} step={first['step_gflop']:.4f} GFLOP;"
        " largest |compiled - loop| server parameter difference:"
        f" {max(r['max_param_difference'] for r in results):.2e}")
  header = ("devices", "compiled steps/s", "loop steps/s", "speedup",
            "batching ceiling",
            "compiled ms", "loop ms", "matmul GFLOP/s", "compiled GFLOP/s",
            "MFU compiled", "MFU loop")
  print(" | ".join(header))
  for r in results:
    print(" | ".join([
        f"{r['devices']:7d}",
        f"{r['compiled_client_steps_per_s']:16.1f}",
        f"{r['loop_client_steps_per_s']:12.1f}",
        f"{r['speedup_vs_loop']:6.2f}x",
        f"{r['batching_ceiling']:15.2f}x",
        f"{1e3 * r['compiled_round_s']:11.1f}",
        f"{1e3 * r['loop_round_s']:7.1f}",
        f"{r['matmul_gflop_per_s']:14.1f}",
        f"{r['compiled_gflop_per_s']:16.2f}",
        f"{r['compiled_mfu']:12.1%}",
        f"{r['loop_mfu']:8.1%}"]))
  print("XLA cost analysis of one round (all devices; loop = clients x the"
        " per-client update) and compile times:")
  print("devices | compiled GFLOP | loop GFLOP | compiled GB accessed |"
        " loop GB accessed | compile s (compiled round) | compile s (loop"
        " update)")
  for r in results:
    print(f"{r['devices']:7d} | {r['compiled_xla_gflop']:14.2f} |"
          f" {r['loop_xla_gflop']:10.2f} | {r['compiled_xla_gbytes']:20.2f} |"
          f" {r['loop_xla_gbytes']:16.2f} | {r['compiled_compile_s']:26.1f} |"
          f" {r['loop_compile_s']:23.1f}")


def main(command_line: cli.ScriptArgs) -> None:
  args, argv = command_line.flags, command_line.argv
  if args.worker_devices:
    print(RESULT_PREFIX + json.dumps(run_worker(args)), flush=True)
    return
  device_counts = [int(n) for n in args.devices]
  for n in device_counts:
    if args.clients % n:
      raise ValueError(f"--clients={args.clients} must be a multiple of every"
                       f" device count; {n} does not divide it.")
  results = [run_device_count(n, argv) for n in device_counts]
  print_table(results)
  print(json.dumps(results))


if __name__ == "__main__":
  cli.run_script(main, define_flags)
