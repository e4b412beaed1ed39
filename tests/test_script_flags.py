"""The scripts of launch/ and benchmarks/ take absl flags, and a bad one ends
them with one line `error: ...` and exit status 1 (conformer_fl/cli.py).

Each case runs the script as a user does, `python SCRIPT ARGS...` in a
subprocess, with a flag that is missing, mistyped or out of range: nothing
is trained or compiled. (benchmarks/analysis_vectorized.py is left out: it
imports TensorFlow, 20 s here, before it reads its flags; it parses them with
the same `cli.run_script`.)
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
POD = ["--name=cfl-v4", "--zone=us-central2-b"]
SWEEP = "--sweep=configs/sweeps/stability.py:seeds=1"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)


def _error_line(result: subprocess.CompletedProcess) -> str:
  """The last stderr line of a refused command line (status 1, no traceback)."""
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stdout == "", result.stdout[-3000:]
  return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script, args, line", [
    ("launch/local_multiprocess.py", ["--num_processes=0", "--", "--x=1"],
     "error: --num_processes and --devices_per_process must be positive."),
    ("launch/local_multiprocess.py", ["--num_proceses=2"],
     "error: Unknown command line flag 'num_proceses'. Did you mean:"
     " num_processes ? (--helpshort lists the flags)"),
    ("launch/local_multiprocess.py", ["--config=configs/central.py"],
     "error: Unknown command line flag 'config' (--helpshort lists the"
     " flags)"),
    ("launch/tpu_pod.py", ["create", *POD, "--runtime_version=r"],
     "error: `create` needs --accelerator_type (--help describes it)."),
    ("launch/tpu_pod.py", ["delete", *POD, "--follow"],
     "error: --follow is not a flag of `delete`; its flags are --dry_run,"
     " --name, --node_id, --project, --zone."),
    ("launch/tpu_pod.py", ["logs", *POD, "--lines=ten"],
     "error: flag --lines=ten: invalid literal for int() with base 10: 'ten'"
     " (--helpshort lists the flags)"),
    ("launch/tpu_pod.py", POD,
     "error: Give a subcommand first, one of create, wait, setup, run, logs,"
     " delete, plan (e.g. tpu_pod.py delete --name=N --zone=Z)."),
    ("launch/sweep.py", [SWEEP, "--workdir=/tmp/x", "--mode=cloud"],
     "error: flag --mode=cloud: value should be one of <local|pod>"
     " (--helpshort lists the flags)"),
    ("launch/sweep.py", ["--workdir=/tmp/x"],
     "error: flag --sweep=None: Flag --sweep must have a value other than"
     " None. (--helpshort lists the flags)"),
    ("launch/sweep.py", [SWEEP, "--sweep.axis=1", "--workdir=/tmp/x"],
     "error: --sweep.axis: sweep has no field 'axis'; did you mean"
     " --sweep.axes?"),
])
def test_launch_scripts_refuse_bad_flags_in_one_line(script, args, line):
  assert _error_line(_run(script, *args)) == line


@pytest.mark.parametrize("script, args, line", [
    ("benchmarks/round_throughput.py", ["--clients=eight"],
     "error: flag --clients=eight: invalid literal for int() with base 10:"
     " 'eight' (--helpshort lists the flags)"),
    ("benchmarks/round_throughput.py", ["--model=XL"],
     "error: flag --model=XL: value should be one of <toy|tiny|S>"
     " (--helpshort lists the flags)"),
    ("benchmarks/round_throughput.py", ["toy"],
     "error: unexpected arguments ['toy']: round_throughput.py takes flags"
     " only (--help lists them)"),
    ("benchmarks/client_data_memory.py", ["--scales=1,8"],
     "error: flag --out=None: Flag --out must have a value other than None."
     " (--helpshort lists the flags)"),
    ("benchmarks/model_step.py", ["--decoder=las"],
     "error: flag --decoder=las: value should be one of <rnnt|ctc>"
     " (--helpshort lists the flags)"),
    ("benchmarks/client_cost.py", ["--size=tiny"],
     "error: Unknown command line flag 'size'. Did you mean: sizes ?"
     " (--helpshort lists the flags)"),
])
def test_benchmarks_refuse_bad_flags_in_one_line(script, args, line):
  assert _error_line(_run(script, *args)) == line


def test_local_launcher_passes_what_follows_the_dashes_to_main():
  # conformer_fl.main gets `--workdir=...` alone and refuses it: no --config.
  result = _run("launch/local_multiprocess.py", "--num_processes=1",
                "--devices_per_process=1", "--", "--workdir=/tmp/none")
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1].startswith(
      "[p0] error: flag --config=None: Flag --config must have a value other"
      " than None."), result.stdout[-3000:]
