"""launch/tpu_pod.py plan (conformer_fl/tools/pod_plan.py): a TPU run planned
here.

The TPU compiles need libtpu (`pip install -e '.[tpu-plan]'`, which `make test`
installs). Every config is the tiny model on 1-second buckets, one local step
of one utterance: compiling the Conformer for a TPU takes about a minute on
two cores, most of it on the front end (framing and FFT); the search for the
most that fits is tested on a cheap step of its own. The plan of a round with
capacity tiers is tested without compiling it; its compile for v5e is
benchmarks/tiered_plan.py.
"""

import importlib.util
import io
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import pytest

from conformer_fl import train
from conformer_fl.federated import fl_round as round_lib
from conformer_fl.federated import mesh as mesh_lib
from conformer_fl.tools import pod_plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import tpu_pod  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import tiered_plan  # pylint: disable=g-import-not-at-top,g-bad-import-order

TOPOLOGY = "v5e:2x2"
SMALL = ("--config.data.bucket_seconds=(1.0,)",
         "--config.federated.local_steps=1",
         "--config.federated.client_batch_size=1")
TINY = ("--config=configs/federated.py:size=tiny", *SMALL)

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is missing: pip install -e '.[tpu-plan]'")


def _plan(*args: str) -> str:
  out = io.StringIO()
  tpu_pod.main(["plan", f"--topology={TOPOLOGY}", *args], out=out)
  return out.getvalue()


@needs_libtpu
@pytest.mark.slow
def test_tiny_round_compiles_for_v5e_and_fits():
  """One compile (about a minute here); the search is tested on a cheaper
  step below: a second compile, at a thousand tiny clients per chip, took
  7 minutes here (docs/tpu_pods.md: at least 1030 clients per chip fit)."""
  plan = _plan("--no_search", "--", *TINY,
               "--config.federated.clients_per_round=8")
  assert "federated round on v5e:2x2: 4 chips (TPU v5 lite), 1 host(s)" in plan
  assert "config.federated.clients_per_round=8: 2 clients per chip" in plan
  used, capacity, free = map(float, re.search(
      r"HBM per chip: ([0-9.]+) GiB used of ([0-9.]+) GiB, ([0-9.]+) GiB free",
      plan).groups())
  assert capacity == 16.0
  assert 0.0 < used < 1.0 and free > 15.0, plan
  round_flops, counted = map(float, re.search(
      r"compiled FLOPs per round: (\S+) \((\S+) counted per chip\)",
      plan).groups())
  step_flops = float(re.search(r"compiled FLOPs per client step: (\S+)",
                               plan).group(1))
  assert counted > 1e7
  # 1 local step x 4 chips; 2 clients per chip.
  assert round_flops == pytest.approx(4 * counted, rel=1e-3)
  assert step_flops == pytest.approx(counted / 2, rel=1e-3)
  assert "max clients per chip" not in plan
  assert re.search(r"compiles: 2/chip fits 0\.\d\d GiB \d+ s$", plan), plan


@needs_libtpu
@pytest.mark.parametrize("config, field", [
    ("configs/federated.py:size=tiny", "federated.clients_per_round=6"),
    ("configs/central.py:size=tiny", "data.batch_size=6"),
])
def test_a_count_that_does_not_divide_over_the_chips_is_refused(config, field):
  with pytest.raises(tpu_pod.LaunchError) as error:
    _plan("--", f"--config={config}", SMALL[0], f"--config.{field}")
  message = str(error.value)
  assert message.startswith(
      f"config.{field} does not divide over the 4 chips of v5e:2x2"), message


@needs_libtpu
def test_too_many_clients_are_refused_naming_the_field():
  # 2**20 clients per chip: their audio and its paddings alone are 125 GiB
  # per chip, so the plan refuses them without compiling.
  with pytest.raises(tpu_pod.LaunchError) as error:
    _plan("--no_search", "--", *TINY,
          f"--config.federated.clients_per_round={4 * 2**20}")
  message = str(error.value)
  assert message.startswith(
      "config.federated.clients_per_round=4194304 (1048576 clients per chip)"
      " does not fit the TPU v5 lite chip of v5e:2x2"), message
  assert ("the federated round's inputs alone take 125.20 GiB per chip (not"
          " compiled), the chip has 16.00 GiB") in message, message
  assert message.endswith("Lower config.federated.clients_per_round (search"
                          " the most that fits without --no_search).")


@needs_libtpu
def test_a_client_batch_too_large_for_one_client_names_the_batch_field():
  # One client's 2**18 one-second utterances: 31 GiB of audio and paddings.
  with pytest.raises(tpu_pod.LaunchError) as error:
    _plan("--", *TINY, "--config.federated.clients_per_round=4",
          f"--config.federated.client_batch_size={2**18}")
  message = str(error.value)
  assert "Not even 1 of the clients per chip fits: lower" in message, message
  assert "config.federated.client_batch_size" in message


def test_bad_plan_arguments_are_refused():
  with pytest.raises(tpu_pod.LaunchError, match="--topology, go before --"):
    _plan("--", *TINY, "--topology=v4:2x2x1")
  with pytest.raises(pod_plan.PlanError, match="needs --config"):
    pod_plan.parse_main_args([])


class _Stop(Exception):
  """Raised by the captured round instead of running it."""


def test_the_plans_round_is_the_runs_round(tiny_corpus_dir, tmp_path,
                                           monkeypatch):
  """The lowered round of the plan (on this machine's 4 CPU devices) is the
  lowered round that `train.train_federated` calls, text for text."""
  args = ["--config=configs/federated.py:size=tiny,corpus=tiny",
          f"--config.data.data_dir={tiny_corpus_dir}",
          "--config.data.tokenizer.vocab_size=48",
          "--config.federated.fixed_round_shape=True",
          "--config.federated.clients_per_round=4", *SMALL[1:]]
  captured = {}
  make_round = round_lib.make_federated_round

  def capturing_make_round(*a, **k):
    round_fn = make_round(*a, **k)

    def first_round(state, data, rng):
      captured["text"] = round_fn.jitted.lower(state, data, rng).as_text()
      raise _Stop()

    return first_round

  monkeypatch.setattr(round_lib, "make_federated_round", capturing_make_round)
  config, _ = pod_plan.parse_main_args(args)
  with pytest.raises(_Stop):
    train.train_federated(config, str(tmp_path / "run"))
  monkeypatch.undo()

  target = pod_plan.get_target("cpu")
  assert target.num_chips == jax.device_count() == 4
  config, _ = pod_plan.parse_main_args(args)
  step = pod_plan.make_step(config, None, target)
  planned = step.lower(step.per_chip(step.requested)).as_text()
  assert "stablehlo" in planned and len(planned) > 10000
  assert planned == captured["text"]


def _rows_step(target: pod_plan.Target, requested: int) -> pod_plan.Step:
  """A step whose HBM grows by 128 MiB per row on each chip: a sharded
  [rows, 2**24] float32 input (64 MiB a row) and an output of its size."""
  mesh = mesh_lib.make_client_mesh(devices=target.devices)
  sharding = mesh_lib.client_sharding(mesh)
  jitted = jax.jit(lambda x: jnp.sin(x) * 2.0, in_shardings=sharding,
                   out_shardings=sharding)
  return pod_plan.Step(
      "rows step", "test.rows", "rows", requested, target.num_chips, jitted,
      lambda n: (jax.ShapeDtypeStruct((n * target.num_chips, 2**24),
                                      jnp.float32, sharding=sharding),))


@needs_libtpu
def test_a_step_the_compiler_cannot_fit_is_refused_with_the_exact_most():
  target = pod_plan.get_target(TOPOLOGY)
  # 200 rows a chip: the input (12.5 GiB) fits the chip, input and output
  # (25 GiB) do not; the compiler refuses it.
  step = _rows_step(target, 4 * 200)
  with pytest.raises(pod_plan.PlanError) as error:
    pod_plan.plan_step(step, target, max_compiles=10)
  message = str(error.value)
  # The compiler gives no total when it runs out: the message says so
  # rather than print an unknown size.
  assert message.startswith(
      "config.test.rows=800 (200 rows per chip) does not fit the TPU v5 lite"
      " chip of v5e:2x2: the compiler ran out of HBM for the rows step, the"
      " chip has 16.00 GiB (compiler: RESOURCE_EXHAUSTED"), message
  assert "?" not in message, message
  most = int(re.search(r"The most that fits is (\d+) rows per chip:"
                       r" --config\.test\.rows=(\d+)\.$", message).group(1))
  # 128 MiB a row, rows padded to the TPU's tiles of 8: 120 rows take 15 GiB,
  # 121 take 16 GiB, over the compiler's 15.75 GiB.
  assert most == 120, message
  fits = pod_plan.compile_probe(step, most, target.hbm_bytes)
  code = fits.memory["generated_code_size_in_bytes"]
  assert fits.fits and fits.hbm_bytes == 15 * 2**30 + code, fits
  over = pod_plan.compile_probe(step, most + 1, target.hbm_bytes)
  assert not over.fits and over.compiled, over
  assert over.available_bytes == int(15.75 * 2**30), over


def test_the_analysis_plan_splits_a_calls_variants_over_the_chips(tmp_path):
  """The analysis evaluation as the pass runs it: `variants_per_call` rounded
  up to a multiple of the chips, each chip evaluating its share."""
  run_config, _ = pod_plan.parse_main_args(
      ["--config=configs/central.py:size=tiny",
       "--config.data.bucket_seconds=(1.0,)"])
  with run_config.unlocked():
    run_config.model.vocab_size = 48
  (tmp_path / "config.json").write_text(run_config.to_json_best_effort())
  config, _ = pod_plan.parse_main_args(
      ["--config=configs/analysis.py", "--config.analysis.variants_per_call=5"])
  target = pod_plan.get_target("cpu")
  step = pod_plan.make_step(config, str(tmp_path), target)
  assert (step.requested, step.divisor) == (8, 4)  # 5 rounds up to 2 a chip.
  stacked, shared, batch = step.arguments(step.per_chip(step.requested))
  leaf = jax.tree.leaves(stacked)[0]
  assert leaf.shape[0] == 8 and leaf.sharding.shard_shape(leaf.shape)[0] == 2
  assert shared == {} and batch["audio"].sharding.is_fully_replicated
  compiled = step.lower(2).compile()
  assert compiled.memory_analysis() is not None


def _refusal(name: str, field: str, unit: str, requested: int,
             per_chip_gib: float, searched: bool) -> str:
  """The refusal of a hand-made plan on v5e:2x2 (4 chips): no compile."""
  target = pod_plan.Target("v5e:2x2", (None,) * 4, "TPU v5 lite", 16 * 2**30)
  step = pod_plan.Step(name, field, unit, requested, 4, None, lambda n: ())
  probe = pod_plan.Probe(requested // 4, False, int(per_chip_gib * 2**30),
                         None, {}, 1.0, compiled=True)
  # A search from a count that does not fit stops at 0 below 1 (exact).
  max_per_chip, exact = ((0, True) if searched and requested == 4 else
                         (None, False))
  return pod_plan.refusal(pod_plan.Plan(step, target, probe, max_per_chip,
                                        exact, (probe,)))


@pytest.mark.parametrize("searched", [False, True])
def test_a_round_that_does_not_fit_at_1_client_per_chip_names_what_helps(
    searched):
  # The L round at a 36 s bucket on v5e (docs/tpu_pods.md: 16.68 GiB at 1 per chip).
  message = _refusal("federated round", "federated.clients_per_round",
                     "clients", 4, 16.68, searched)
  assert message == (
      "config.federated.clients_per_round=4 (1 clients per chip) does not fit"
      " the TPU v5 lite chip of v5e:2x2: the federated round needs 16.68 GiB"
      " of HBM per chip, the chip has 16.00 GiB. Not even 1 of the clients per"
      " chip fits: lower config.federated.client_batch_size, the longest of"
      " config.data.bucket_seconds or the model size (config.model), or plan"
      " for a chip with more HBM."), message
  # 1 per chip is the least: lowering the count cannot help.
  assert "Lower config.federated.clients_per_round" not in message
  assert "--max_compiles" not in message


def test_a_central_step_that_does_not_fit_at_1_example_per_chip():
  message = _refusal("central step", "data.batch_size", "examples", 4, 17.0,
                     searched=False)
  assert message.endswith(
      "Not even 1 of the examples per chip fits: lower the longest of"
      " config.data.bucket_seconds or the model size (config.model), or plan"
      " for a chip with more HBM."), message


def test_an_unsearched_count_above_1_per_chip_is_told_to_lower_the_count():
  # The M round on v5e at 2 clients per chip (docs/tpu_pods.md: 18.68 GiB).
  message = _refusal("federated round", "federated.clients_per_round",
                     "clients", 8, 18.68, searched=False)
  assert message.endswith(
      "the chip has 16.00 GiB. Lower config.federated.clients_per_round"
      " (search the most that fits without --no_search)."), message


def test_plan_dry_run_prints_the_step_and_compiles_nothing(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("plan --dry-run compiled")
  monkeypatch.setattr(pod_plan, "compile_probe", fail)
  monkeypatch.setattr(pod_plan.Step, "lower", fail)
  out = io.StringIO()
  tpu_pod.main(["plan", "--dry-run", "--topology=cpu", "--",
                "--config=configs/central.py:size=tiny,corpus=tiny",
                "--config.data.bucket_seconds=(1.0,)",
                "--config.data.batch_size=4", "--log_dir=/tmp/unused"], out=out)
  lines = out.getvalue().splitlines()
  # The 4 CPU devices of tests/conftest.py.
  assert lines[0] == ("would compile: the central step of config.mode='central'"
                      " for cpu: 4 chips (cpu), 1 host(s), no capacity (no"
                      " search)")
  assert lines[1] == "  config.data.batch_size=4: 1 examples per chip"
  # The batch's audio: 4 examples of the 1 s bucket at 16 kHz.
  assert lines[2].endswith("the largest (all chips): float32[4, 16000]")
  assert lines[-1] == "  nothing compiled (--dry-run)"


# Three capacity tiers of 4 clients each: one per chip of v5e:2x2 (and of the
# 4 CPU devices of tests/conftest.py).
TIERED = (*TINY, "--config.federated.clients_per_round=12",
          "--config.federated.dropout.tiers="
          "((0.333333,1.0),(0.333333,0.75),(0.333334,0.5))",
          "--config.federated.dropout.unit_kinds=('ffn','conv')",
          "--config.federated.dropout.policy=static")
# The tiny model (2 blocks): ffn 4 x 32 = 128 hidden units, conv 32
# channels; width 0.75 keeps 96 and 24, width 0.5 64 and 16.
TIER_LINES = (
    "  capacity tiers (config.federated.dropout.tiers, policy 'static'), each"
    " vmapped at its own widths:",
    "    tier 0: fraction 0.333333, width 1: 1 clients per chip (4 in all),"
    " full model",
    "    tier 1: fraction 0.333333, width 0.75: 1 clients per chip (4 in all),"
    " kept units encoder/block_*/ffn1 96/128, encoder/block_*/conv 24/32,"
    " encoder/block_*/ffn2 96/128",
    "    tier 2: fraction 0.333334, width 0.5: 1 clients per chip (4 in all),"
    " kept units encoder/block_*/ffn1 64/128, encoder/block_*/conv 16/32,"
    " encoder/block_*/ffn2 64/128")


def test_a_tiered_round_lists_its_tiers_without_compiling():
  out = io.StringIO()
  tpu_pod.main(["plan", "--dry-run", "--topology=cpu", "--", *TIERED],
               out=out)
  lines = out.getvalue().splitlines()
  assert lines[1] == "  config.federated.clients_per_round=12: 3 clients per chip"
  assert tuple(lines[3:7]) == TIER_LINES, lines


def test_tiers_that_do_not_divide_over_the_chips_are_refused():
  with pytest.raises(tpu_pod.LaunchError, match="Capacity tier 1 of config"
                     r"\.federated\.dropout\.tiers has 2 clients, not a"
                     " multiple of the 4 chips"):
    tpu_pod.main(["plan", "--dry-run", "--topology=cpu", "--", *TINY,
                  "--config.federated.clients_per_round=8",
                  "--config.federated.dropout.tiers=((0.5,1.0),(0.25,0.75),"
                  "(0.25,0.5))"], out=io.StringIO())


def test_a_tiered_round_is_planned_with_one_compile_and_no_search(
    monkeypatch):
  """The plan of a tiered round on a 4-chip target with HBM: one compile, at
  the tiers' 3 clients per chip, no search, and each tier's widths listed.
  The compile is a stand-in here (it records what is asked); the round
  compiled for v5e (HBM per chip, compile seconds) is
  benchmarks/tiered_plan.py, which plans this config."""
  compiled = []

  def fake_compile(step, per_chip, capacity, log=None):
    del log
    compiled.append((step.name, per_chip, capacity))
    memory = dict(argument_size_in_bytes=2**20, output_size_in_bytes=2**20,
                  alias_size_in_bytes=0, temp_size_in_bytes=2**20,
                  generated_code_size_in_bytes=0)
    return pod_plan.Probe(per_chip, True, 2**29, 1e9, memory, 2.0,
                          compiled=True)

  monkeypatch.setattr(pod_plan, "compile_probe", fake_compile)
  # The 4 CPU devices of tests/conftest.py, with a v5e chip's HBM.
  target = pod_plan.Target(TOPOLOGY, tuple(jax.devices()), "TPU v5 lite",
                           16 * 2**30)
  config, workdir = pod_plan.parse_main_args(list(TIERED))
  step = pod_plan.make_step(config, workdir, target)
  assert not step.searchable
  plan = pod_plan.plan_step(step, target, search=True, max_compiles=4)
  assert compiled == [("federated round", 3, 16 * 2**30)]
  assert plan.max_per_chip is None and len(plan.probes) == 1
  lines = pod_plan.format_plan(plan).splitlines()
  assert lines[1] == "  config.federated.clients_per_round=12: 3 clients per chip"
  assert lines[2] == "  HBM per chip: 0.50 GiB used of 16.00 GiB, 15.50 GiB free"
  assert tuple(lines[3:7]) == TIER_LINES, lines
  assert ("  max clients per chip: not searched (the capacity tiers fix each"
          " tier's clients; plan another config.federated.clients_per_round"
          " to compare)") in lines, lines
  assert lines[-1] == "  compiles: 3/chip fits 0.50 GiB 2 s", lines


def test_the_benchmark_plans_the_tiered_round_of_this_module():
  assert tiered_plan.TIERED_ROUND == TIERED
