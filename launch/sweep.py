r"""Runs a sweep (configs/sweeps/NAME.py): every point locally or on TPU pods.

  python launch/sweep.py --sweep=configs/sweeps/stability.py[:ARG] \
      --workdir=/tmp/cfl/stability [--analysis] [--dry-run] \
      [-- --config.data.data_dir=DIR ...]

The flags are absl flags (`--help` lists them); --sweep is an ml_collections
config file flag, so --sweep.FIELD=VALUE overrides a field of the sweep. A bad
flag, or a sweep file that does not load, ends the script with one line
`error: ...`, exit status 1.

Each point (see `conformer_fl.tools.sweep`) is a run of `python -m conformer_fl.main`
in WORKDIR/<point>, e.g. /tmp/cfl/stability/seed0_norm-group_norm. Arguments
after `--` are added to every point's command (things of this machine rather
than of the experiment, such as the data directory).

--mode=local (default) runs the points one after another in this process's
environment, from the repository root; a point already finished resumes and
ends at once, so an interrupted sweep is continued by running it again. The
first failure stops the sweep. With --analysis, the analysis pass then runs
on every point's workdir, the first point last, comparing it with the others
(`--config.analysis.compare_workdirs`): the comparison (Jaccard overlap of the
ambient sets, rank correlations of the importance, for every pair of runs) is
the "stability" of <first point>/analysis/importance.json, shown in its
report.md, and copied to WORKDIR/stability.json.

--mode=pod starts the points on Cloud TPU pods set up with
launch/tpu_pod.py (create, wait, setup), in the background, and returns:

  python launch/sweep.py --sweep=configs/sweeps/stability.py:sizes=S \
      --mode=pod --workdir=gs://BUCKET/cfl/stability --name=cfl-a,cfl-b \
      --zone=us-central2-b [--project=P] --tfds_data_dir=gs://BUCKET/tfds

Points are dealt to the pods of --name in turn; each pod runs its points one
after another (a failed point does not stop the next), logging to
~/conformer_fl/logs/<sweep>.<point>.workerN.log (launch/tpu_pod.py logs
--job=<sweep>.<point>). The analysis pass reads and writes local files and runs
on one host: when the pod runs are done, copy the sweep down
(`gsutil -m cp -r gs://BUCKET/cfl/stability /tmp/cfl/`) and run this script
with --mode=local --analysis on the copy (the finished runs do not train again;
they need the same data, e.g. TFDS_DATA_DIR).
"""

from collections.abc import Sequence
import functools
import json
import os
import sys
import time

from absl import flags
import ml_collections
from ml_collections import config_flags
import tpu_pod  # launch/tpu_pod.py, beside this file.

from conformer_fl import cli
from conformer_fl.tools import sweep as sweep_lib

ROOT = tpu_pod.ROOT
STABILITY_FILE = "stability.json"
Sweep = ml_collections.ConfigDict
Points = Sequence[sweep_lib.Point]


def train_commands(sweep: Sweep, points: Points, workdir: str,
                   extra: Sequence[str]) -> list[list[str]]:
  """`python -m conformer_fl.main` of every point, in WORKDIR/<point>."""
  return [[sys.executable, "-m", "conformer_fl.main", *sweep_lib.main_args(
      sweep, p, sweep_lib.point_workdir(workdir, p), extra)] for p in points]


def analysis_commands(sweep: Sweep, points: Points,
                      workdir: str) -> list[list[str]]:
  """Analysis of every point; the first last, compared with the others."""
  workdirs = [sweep_lib.point_workdir(workdir, p) for p in points]
  order = list(range(1, len(points))) + [0]
  return [[sys.executable, "-m", "conformer_fl.main", *sweep_lib.analysis_args(
      sweep, workdirs[i], workdirs[1:] if i == 0 else ())] for i in order]


def pod_commands(sweep: Sweep, points: Points, workdir: str,
                 extra: Sequence[str], pods: Sequence[tpu_pod.Pod],
                 tfds_data_dir: str,
                 name: str) -> list[list[str]]:
  """One `tpu_pod run` per pod, with the points dealt to the pods in turn."""
  tpu_pod.check_gcs_workdir(workdir)
  commands = []
  for index, pod in enumerate(pods):
    runs = [(f"{name}.{p.dirname}", sweep_lib.main_args(
        sweep, p, sweep_lib.point_workdir(workdir, p), extra))
            for p in points[index::len(pods)]]
    if runs:
      commands += tpu_pod.run_commands(pod, runs, tfds_data_dir)
  return commands


def write_stability(points: Points, workdir: str) -> dict:
  """The first point's comparison -> WORKDIR/stability.json; prints it."""
  first = sweep_lib.point_workdir(workdir, points[0])
  with open(os.path.join(first, "analysis", "importance.json")) as f:
    stability = json.load(f)["stability"]
  with open(os.path.join(workdir, STABILITY_FILE), "w") as f:
    json.dump(dict(points={p.dirname: p.name for p in points}, **stability),
              f, indent=2)
  names = {sweep_lib.point_workdir(os.path.abspath(workdir), p): p.dirname
           for p in points}
  for pair in stability["pairs"]:
    rho = pair["wer_increase"]["spearman"]["statistic"]
    overlap = pair["jaccard_ambient"]  # None: neither run has an ambient unit.
    a, b = names.get(pair["a"], pair["a"]), names.get(pair["b"], pair["b"])
    print(f"{a} vs {b}: Jaccard(ambient) ="
          f" {'none ambient' if overlap is None else f'{overlap:.3f}'},"
          f" Spearman(WER increase) = {rho if rho is None else f'{rho:.3f}'}")
  return stability


def define_flags(flag_values: flags.FlagValues,
                 sys_argv: Sequence[str] | None = None) -> None:
  """The sweep's flags (absl); --sweep is an ml_collections config file flag
  (`sys_argv`: the command line its --sweep.FIELD overrides are read from,
  default sys.argv). --dry_run is also --dry-run, --tfds_data_dir also
  --tfds-data-dir."""
  config_flags.DEFINE_config_file(
      "sweep", None, "configs/sweeps/NAME.py[:ARG]; --sweep.FIELD=VALUE"
      " overrides a field of it.", flag_values=flag_values, lock_config=True,
      sys_argv=None if sys_argv is None else list(sys_argv))
  flags.DEFINE_string("workdir", None,
                      "Root of the points' workdirs (gs:// for pods).",
                      flag_values=flag_values)
  flags.DEFINE_enum("mode", "local", ["local", "pod"],
                    "local: run the points here, one after another; pod: start"
                    " them on the TPU pods of --name.", flag_values=flag_values)
  flags.DEFINE_bool("dry_run", False,
                    "Print the commands instead of running them.",
                    flag_values=flag_values)
  flags.DEFINE_bool("analysis", False,
                    "Then the analysis pass and the stability comparison.",
                    flag_values=flag_values)
  flags.DEFINE_string("name", None, "--mode=pod: queued-resource name(s),"
                      " comma-separated (see launch/tpu_pod.py).",
                      flag_values=flag_values)
  flags.DEFINE_string("zone", None, "--mode=pod: the pods' zone.",
                      flag_values=flag_values)
  flags.DEFINE_string("project", None, "--mode=pod: GCP project; default:"
                      " gcloud's.", flag_values=flag_values)
  flags.DEFINE_string("tfds_data_dir", None, "--mode=pod: exported as"
                      " TFDS_DATA_DIR on the pods.", flag_values=flag_values)
  flags.mark_flags_as_required(["sweep", "workdir"], flag_values=flag_values)
  for name in ("dry_run", "tfds_data_dir"):
    flags.DEFINE_alias(name.replace("_", "-"), name, flag_values=flag_values)


PARSE_OPTIONS = dict(config_flag_names=("sweep",), after_dashes=True)


def run_command_line(args: cli.ScriptArgs, out=None) -> None:
  """Runs (or prints) the sweep.

  Raises:
    tpu_pod.LaunchError: bad flags or a failed command. ValueError: a bad
    sweep config.
  """
  f, extra = args.flags, args.after_dashes
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown:
    raise tpu_pod.LaunchError(
        f"Unexpected arguments {unknown}: after --, give --config.FIELD=VALUE"
        " overrides for every point.")
  sweep = f.sweep
  points = sweep_lib.expand(sweep)
  sweep_lib.check_points(sweep, points, ROOT, extra)
  workdir = f.workdir
  if not workdir.startswith("gs://"):
    workdir = os.path.abspath(workdir)  # The runs start in the repository root.
  if f.mode == "pod":
    if f.analysis:
      raise tpu_pod.LaunchError(
          "--analysis runs on one host with local files: when the pod runs are"
          " done, copy the sweep down (gsutil -m cp -r WORKDIR DIR) and run"
          " --mode=local --analysis --workdir=DIR/<name>.")
    if not f.name or not f.zone or not f.tfds_data_dir:
      raise tpu_pod.LaunchError("--mode=pod needs --name, --zone and"
                                " --tfds_data_dir.")
    pods = [tpu_pod.Pod(n, f.zone, f.project) for n in f.name.split(",")]
    name = sweep_lib.sweep_name(config_flags.get_config_filename(f["sweep"]))
    tpu_pod.execute(pod_commands(sweep, points, workdir, extra, pods,
                                 f.tfds_data_dir, name),
                    f.dry_run, out=out)
    return
  if workdir.startswith("gs://") and f.analysis:
    raise tpu_pod.LaunchError(
        "--analysis needs a local --workdir (the analysis pass writes local"
        " files); copy the sweep down first.")
  commands = train_commands(sweep, points, workdir, extra)
  if f.analysis:
    commands += analysis_commands(sweep, points, workdir)
  if f.dry_run:
    tpu_pod.execute(commands, dry_run=True, out=out)
    return
  for index, command in enumerate(commands):
    tic = time.perf_counter()
    tpu_pod.execute([command], dry_run=False, cwd=ROOT)
    print(f"[{index + 1}/{len(commands)}] done in"
          f" {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)
  if f.analysis and len(points) > 1:
    write_stability(points, workdir)


def main(argv: Sequence[str], out=None) -> None:
  """The command line `sweep.py ARGV...`, run in this process.

  Raises:
    As run_command_line. A flag that does not parse (a missing sweep file
    too) ends the program (`cli.fail`).
  """
  argv = ["sweep.py", *argv]
  run_command_line(cli.parse_script_flags(
      argv, functools.partial(define_flags, sys_argv=argv), **PARSE_OPTIONS),
                   out=out)


if __name__ == "__main__":
  cli.run_script(run_command_line, define_flags,
                 errors=(tpu_pod.LaunchError, ValueError), **PARSE_OPTIONS)
