"""Sweeps: expansion into named points and commands; a tiny sweep end to end.

The end-to-end test runs configs/sweeps/stability.py (two seeds, tiny model and
corpus, two steps) through launch/sweep.py --analysis in a subprocess with this
session's environment, so its runs share the persistent compilation cache. The
seed-0 point has the model and data settings of the central run of
tests/test_train_e2e.py, so the two tests compile its programs once; the
seed-1 point reuses all but the training step (its seed is a constant of it).
"""

import io
import json
import os
import pathlib
import shlex
import subprocess
import sys

import ml_collections
import pytest

from conformer_fl.analysis import stability
from conformer_fl.tools import sweep as sweep_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import sweep as sweep_launcher  # pylint: disable=g-import-not-at-top,wrong-import-position
import tpu_pod  # pylint: disable=g-import-not-at-top,wrong-import-position

PY = shlex.quote(sys.executable)
MAIN = f"{PY} -m conformer_fl.main"


def _sweep(axes, arg="size=tiny,corpus=tiny", overrides=(), analysis=None):
  sweep = ml_collections.ConfigDict()
  sweep.base = ml_collections.ConfigDict(dict(config="configs/central.py",
                                              arg=arg))
  sweep.axes = tuple(axes)
  sweep.overrides = tuple(overrides)
  if analysis is not None:
    sweep.analysis = ml_collections.ConfigDict(analysis)
  return sweep


def test_expand_names_and_order():
  sweep = _sweep([("seed", (0, 1)), ("norm", ("group_norm", "batch_norm"))])
  points = sweep_lib.expand(sweep)
  assert [p.name for p in points] == [
      "seed=0,norm=group_norm", "seed=0,norm=batch_norm",
      "seed=1,norm=group_norm", "seed=1,norm=batch_norm"]
  assert [p.dirname for p in points] == [
      "seed0_norm-group_norm", "seed0_norm-batch_norm",
      "seed1_norm-group_norm", "seed1_norm-batch_norm"]
  assert points[3].values == (("seed", 1), ("norm", "batch_norm"))


def test_point_commands():
  sweep = _sweep(
      [("size", ("tiny", "demo")), ("seed", (3,)),
       ("config.central.peak_learning_rate", (0.001,)),
       ("config.central.clip_grad_norm", (2.5,))],
      arg="size=S,corpus=tiny,steps=20",
      overrides=("eval_max_batches=2", "central.log_every=5"))
  points = sweep_lib.expand(sweep)
  assert [p.dirname for p in points] == [
      "size-tiny_seed3_central.peak_learning_rate0.001_central.clip_grad_norm2.5",
      "size-demo_seed3_central.peak_learning_rate0.001_central.clip_grad_norm2.5"]
  # The axis value replaces size in place; seed is added; fields become flags.
  assert sweep_lib.main_args(sweep, points[1], "/w/p", ["--config.x=1"]) == [
      "--config=configs/central.py:size=demo,corpus=tiny,steps=20,seed=3",
      "--workdir=/w/p",
      "--config.eval_max_batches=2",
      "--config.central.log_every=5",
      "--config.central.peak_learning_rate=0.001",
      "--config.central.clip_grad_norm=2.5",
      "--config.x=1"]
  assert sweep_lib.point_workdir("gs://b/sw/", points[0]) == (
      f"gs://b/sw/{points[0].dirname}")


def test_values_are_formatted_and_made_directory_safe():
  sweep = _sweep([("config.model.use_bias", (True, False)),
                  ("domain", ("all",)), ("config.tag", ("a b/c",))])
  points = sweep_lib.expand(sweep)
  assert [p.name for p in points] == [
      "config.model.use_bias=true,domain=all,config.tag=a b/c",
      "config.model.use_bias=false,domain=all,config.tag=a b/c"]
  assert [p.dirname for p in points] == [
      "model.use_bias-true_domain-all_tag-a-b-c",
      "model.use_bias-false_domain-all_tag-a-b-c"]


def test_analysis_args():
  sweep = _sweep([("seed", (0,))], analysis=dict(
      config="configs/analysis.py", arg="granularity=module,seeds=1",
      overrides=("analysis.eval_max_batches=1",)))
  assert sweep_lib.analysis_args(sweep, "/w/a", ["/w/b", "/w/c"]) == [
      "--config=configs/analysis.py:granularity=module,seeds=1",
      "--workdir=/w/a",
      "--config.analysis.eval_max_batches=1",
      "--config.analysis.compare_workdirs=('/w/b', '/w/c')"]
  # Without an analysis section: configs/analysis.py with its defaults.
  assert sweep_lib.analysis_args(_sweep([("seed", (0,))]), "/w/a") == [
      "--config=configs/analysis.py", "--workdir=/w/a"]


@pytest.mark.parametrize("axes, message", [
    ([], "sweep.axes is empty"),
    ([("seed", ())], "Axis 'seed' has no values"),
    ([("seed", (0, 0))], "Axis 'seed' repeats a value"),
    ([("seed", (0,)), ("seed", (1,))], "Repeated axis keys"),
    ([("bad-key", (0,))], "Bad axis key 'bad-key'"),
    ([("config.", (0,))], "Bad axis key 'config.'"),
    ([("norm", ("a,b",))], "cannot go in a config argument"),
    ([("seed", ([0],))], "values must be numbers, strings or booleans"),
    ([("config.tag", ("a b", "a-b"))], "Two points share a directory name"),
    ([("seed", 0)], "Bad axis"),
])
def test_bad_sweeps_raise_clear_errors(axes, message):
  with pytest.raises(ValueError, match=message):
    sweep_lib.expand(_sweep(axes))


def test_bad_overrides_and_arguments_are_named():
  with pytest.raises(ValueError, match="Bad override 'central.x' in"):
    sweep_lib.expand(_sweep([("seed", (0,))], overrides=("central.x",)))
  with pytest.raises(ValueError, match="Bad config argument item 'size'"):
    sweep_lib.expand(_sweep([("seed", (0,))], arg="size"))
  sweep = _sweep([("colour", ("red",))])
  with pytest.raises(ValueError, match="Sweep point colour=red: Bad config"
                     " argument 'colour=red'"):
    sweep_lib.check_points(sweep, sweep_lib.expand(sweep), str(ROOT))
  sweep = _sweep([("seed", (0,))], overrides=("central.no_such_field=1",))
  with pytest.raises(ValueError, match="Sweep point seed=0: configs/central.py"
                     " has no field 'central.no_such_field'"):
    sweep_lib.check_points(sweep, sweep_lib.expand(sweep), str(ROOT))


def test_stability_sweep_config():
  sweep = sweep_lib.load_config_file("configs/sweeps/stability.py", str(ROOT))
  points = sweep_lib.expand(sweep)
  assert [p.dirname for p in points] == [
      f"seed{s}_norm-{n}" for s in range(3) for n in ("group_norm",
                                                        "batch_norm")]
  sweep = sweep_lib.load_config_file(
      "configs/sweeps/stability.py:sizes=S+M,seeds=2,norms=batch_norm", str(ROOT))
  assert [p.name for p in sweep_lib.expand(sweep)] == [
      "size=S,seed=0,norm=batch_norm", "size=S,seed=1,norm=batch_norm",
      "size=M,seed=0,norm=batch_norm", "size=M,seed=1,norm=batch_norm"]
  with pytest.raises(ValueError, match="seeds must be >= 1"):
    sweep_lib.load_config_file("configs/sweeps/stability.py:seeds=0", str(ROOT))


def _launch_dry_run(*args) -> list[str]:
  out = io.StringIO()
  sweep_launcher.main([*args[:2], "--dry-run", *args[2:]], out=out)
  return out.getvalue().splitlines()


def test_local_dry_run_commands(tmp_path):
  w = tmp_path / "sw"
  lines = _launch_dry_run(
      "--sweep=configs/sweeps/stability.py:sizes=tiny,corpus=tiny,steps=3,"
      "seeds=1,eval_batches=1", f"--workdir={w}", "--analysis", "--",
      "--config.data.data_dir=/data")
  base = "--config=configs/central.py:size=tiny,corpus=tiny,domain=long,steps=3"
  analysis = "--config=configs/analysis.py:granularity=block,seeds=3"
  assert lines == [
      f"{MAIN} {base},seed=0,norm=group_norm --workdir={w}/seed0_norm-group_norm"
      " --config.eval_max_batches=1 --config.data.data_dir=/data",
      f"{MAIN} {base},seed=0,norm=batch_norm --workdir={w}/seed0_norm-batch_norm"
      " --config.eval_max_batches=1 --config.data.data_dir=/data",
      # The other points first, then the first one, compared with them.
      f"{MAIN} {analysis} --workdir={w}/seed0_norm-batch_norm"
      " --config.analysis.eval_max_batches=1",
      f"{MAIN} {analysis} --workdir={w}/seed0_norm-group_norm"
      " --config.analysis.eval_max_batches=1"
      f" '--config.analysis.compare_workdirs=('\"'\"'{w}/seed0_norm-batch_norm"
      "'\"'\"',)'",
  ]


def test_pod_dry_run_deals_points_to_pods():
  lines = _launch_dry_run(
      "--sweep=configs/sweeps/stability.py:sizes=S,corpus=librispeech,seeds=3,"
      "norms=group_norm", "--workdir=gs://b/st", "--mode=pod",
      "--name=pod-a,pod-b", "--zone=us-central2-b",
      "--tfds_data_dir=gs://b/tfds")
  base = "--config=configs/central.py:size=S,corpus=librispeech,domain=long,steps=1200"
  runs = {s: (f"stability.seed{s}_norm-group_norm",
              [f"{base},seed={s},norm=group_norm",
               f"--workdir=gs://b/st/seed{s}_norm-group_norm"])
          for s in range(3)}
  expected = [
      tpu_pod.run_commands(tpu_pod.Pod("pod-a", "us-central2-b"),
                           [runs[0], runs[2]], "gs://b/tfds")[0],
      tpu_pod.run_commands(tpu_pod.Pod("pod-b", "us-central2-b"),
                           [runs[1]], "gs://b/tfds")[0]]
  assert lines == [shlex.join(c) for c in expected]
  assert "logs/stability.seed1_norm-group_norm.worker$CLOUD_TPU_TASK_ID.log" in (
      lines[1])


@pytest.mark.parametrize("args, message", [
    (["--mode=pod", "--workdir=/tmp/x", "--name=a", "--zone=us-central2-b",
      "--tfds_data_dir=gs://b/t"], "must be on GCS"),
    (["--mode=pod", "--workdir=gs://b/x", "--name=a", "--zone=us-central2-b",
      "--tfds_data_dir=gs://b/t", "--analysis"], "--analysis runs on one host"),
    (["--mode=pod", "--workdir=gs://b/x"], "--mode=pod needs --name, --zone"),
    (["--workdir=gs://b/x", "--analysis"], "--analysis needs a local --workdir"),
    (["--workdir=/tmp/x", "--", "--steps=3"], "Unexpected arguments"),
])
def test_bad_launch_flags(args, message):
  with pytest.raises((tpu_pod.LaunchError, ValueError), match=message):
    sweep_launcher.main(["--sweep=configs/sweeps/stability.py:seeds=1",
                         "--dry-run", *args], out=io.StringIO())


@pytest.mark.slow
def test_tiny_sweep_end_to_end_with_analysis(tmp_path, tiny_corpus_dir,
                                              tiny_central_overrides):
  workdir = tmp_path / "stability"
  command = [
      sys.executable, "launch/sweep.py",
      "--sweep=configs/sweeps/stability.py:sizes=tiny,corpus=tiny,domain=all,"
      "steps=2,seeds=2,norms=group_norm,eval_batches=1,analysis_seeds=0",
      f"--workdir={workdir}", "--analysis", "--",
      f"--config.data.data_dir={tiny_corpus_dir}",
      *tiny_central_overrides,
  ]
  result = subprocess.run(command, cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 0, (
      f"{shlex.join(command)} failed:\n{result.stdout[-3000:]}\n"
      f"{result.stderr[-6000:]}")
  first, second = (workdir / "seed0_norm-group_norm",
                   workdir / "seed1_norm-group_norm")
  assert sorted(p.name for p in workdir.iterdir()) == [
      "seed0_norm-group_norm", "seed1_norm-group_norm", "stability.json"]
  results = {}
  for run in (first, second):
    assert sorted(p.name for p in (run / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["0", "2"]
    config = json.loads((run / "config.json").read_text())
    assert config["seed"] == int(run.name[4])
    results[run] = json.loads((run / "analysis" / "importance.json").read_text())
    assert results[run]["trained_step"] == 2
  # The first point's analysis compares it with the second.
  assert results[second]["stability"] is None
  comparison = results[first]["stability"]
  assert comparison["runs"] == [str(first), str(second)]
  [pair] = comparison["pairs"]
  assert (pair["a"], pair["b"]) == (str(first), str(second))
  assert pair["num_common_units"] == len(results[first]["units"]) == 4
  assert pair["jaccard_ambient"] == stability.jaccard(
      results[first]["ambient"], results[second]["ambient"])
  assert (first / "analysis" / "stability_depth.png").exists()
  assert "## Stability across runs" in (first / "analysis" / "report.md"
                                        ).read_text()
  summary = json.loads((workdir / "stability.json").read_text())
  assert summary["points"] == {"seed0_norm-group_norm": "seed=0,norm=group_norm",
                               "seed1_norm-group_norm": "seed=1,norm=group_norm"}
  assert summary["pairs"] == comparison["pairs"]
  overlap = pair["jaccard_ambient"]
  assert (f"seed0_norm-group_norm vs seed1_norm-group_norm: Jaccard(ambient) ="
          f" {'none ambient' if overlap is None else f'{overlap:.3f}'}") in (
              result.stdout)
