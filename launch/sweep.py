r"""Runs a sweep (configs/sweeps/NAME.py): every point locally or on TPU pods.

  python launch/sweep.py --sweep=configs/sweeps/stability.py[:ARG] \
      --workdir=/tmp/cfl/stability [--analysis] [--dry-run] \
      [-- --config.data.data_dir=DIR ...]

Each point (see `conformer_fl.tools.sweep`) is a run of
`python -m conformer_fl.main` in WORKDIR/<point>, e.g. /tmp/cfl/stability/seed0_norm-group_norm. Arguments
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

import argparse
from collections.abc import Sequence
import json
import os
import sys
import time

import ml_collections
import tpu_pod  # launch/tpu_pod.py, beside this file.

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


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="launch/sweep.py", description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", required=True,
                      help="configs/sweeps/NAME.py[:ARG]")
  parser.add_argument("--workdir", required=True,
                      help="Root of the points' workdirs (gs:// for pods).")
  parser.add_argument("--mode", choices=("local", "pod"), default="local")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run",
                      action="store_true",
                      help="Print the commands instead of running them.")
  parser.add_argument("--analysis", action="store_true",
                      help="Then the analysis pass and the stability"
                      " comparison.")
  pod = parser.add_argument_group("--mode=pod (see launch/tpu_pod.py)")
  pod.add_argument("--name", default=None,
                   help="Queued-resource name(s), comma-separated.")
  pod.add_argument("--zone", default=None)
  pod.add_argument("--project", default=None)
  pod.add_argument("--tfds_data_dir", "--tfds-data-dir", dest="tfds_data_dir",
                   default=None)
  return parser


def main(argv: Sequence[str] | None = None, out=None) -> None:
  """Runs (or prints) the sweep.

  Raises:
    tpu_pod.LaunchError: bad flags or a failed command. ValueError,
    FileNotFoundError: a bad sweep config.
  """
  args, extra = build_parser().parse_known_args(argv)
  if extra and extra[0] == "--":
    extra = extra[1:]
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown:
    raise tpu_pod.LaunchError(
        f"Unexpected arguments {unknown}: after --, give --config.FIELD=VALUE"
        " overrides for every point.")
  sweep = sweep_lib.load_config_file(args.sweep, ROOT)
  points = sweep_lib.expand(sweep)
  sweep_lib.check_points(sweep, points, ROOT, extra)
  workdir = args.workdir
  if not workdir.startswith("gs://"):
    workdir = os.path.abspath(workdir)  # The runs start in the repository root.
  if args.mode == "pod":
    if args.analysis:
      raise tpu_pod.LaunchError(
          "--analysis runs on one host with local files: when the pod runs are"
          " done, copy the sweep down (gsutil -m cp -r WORKDIR DIR) and run"
          " --mode=local --analysis --workdir=DIR/<name>.")
    if not args.name or not args.zone or not args.tfds_data_dir:
      raise tpu_pod.LaunchError("--mode=pod needs --name, --zone and"
                                " --tfds_data_dir.")
    pods = [tpu_pod.Pod(n, args.zone, args.project)
            for n in args.name.split(",")]
    tpu_pod.execute(pod_commands(sweep, points, workdir, extra, pods,
                                 args.tfds_data_dir,
                                 sweep_lib.sweep_name(args.sweep)),
                    args.dry_run, out=out)
    return
  if workdir.startswith("gs://") and args.analysis:
    raise tpu_pod.LaunchError(
        "--analysis needs a local --workdir (the analysis pass writes local"
        " files); copy the sweep down first.")
  commands = train_commands(sweep, points, workdir, extra)
  if args.analysis:
    commands += analysis_commands(sweep, points, workdir)
  if args.dry_run:
    tpu_pod.execute(commands, dry_run=True, out=out)
    return
  for index, command in enumerate(commands):
    tic = time.perf_counter()
    tpu_pod.execute([command], dry_run=False, cwd=ROOT)
    print(f"[{index + 1}/{len(commands)}] done in"
          f" {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)
  if args.analysis and len(points) > 1:
    write_stability(points, workdir)


if __name__ == "__main__":
  try:
    main()
  except (tpu_pod.LaunchError, ValueError, FileNotFoundError) as error:
    print(f"sweep.py: error: {error}", file=sys.stderr)
    sys.exit(1)
