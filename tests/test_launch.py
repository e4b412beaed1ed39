"""launch/tpu_pod.py: the exact gcloud commands of every subcommand (--dry-run).

No gcloud is needed: dry runs only print, and the one test that runs a
command runs `true` / `false`. The remote shell command of `run` is also
executed by bash in a fake home directory (a stand-in python and curl), to
check that it starts the job in the background with the environment the entry
point needs.
"""

import io
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import tpu_pod  # pylint: disable=g-import-not-at-top,wrong-import-position

POD = ["--name=cfl-v4", "--zone=us-central2-b", "--project=my-proj"]
LOCATION = "--zone=us-central2-b --project=my-proj"
SSH = f"gcloud compute tpus tpu-vm ssh cfl-v4 {LOCATION}"

SETUP_REMOTE = (
    "(python3.11 -c 'import ensurepip' 2>/dev/null || (sudo apt-get -qq update"
    " && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y"
    " python3.11-venv)) && mkdir -p conformer_fl && cd conformer_fl && find ."
    " -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} + &&"
    " tar -xzf ../conformer_fl.tar.gz && python3.11 -m venv .venv &&"
    " .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e ."
    " 'jax[tpu]' && .venv/bin/python -c 'import jax, conformer_fl;"
    " print(\"jax\", jax.__version__)'")

RUN_REMOTE = (
    "cd conformer_fl && mkdir -p logs && if pgrep -f"
    " '^[^ ]*python[^ ]* -m conformer_fl[.]main' > /dev/null; then echo"
    " \"$(hostname): a conformer_fl.main job is still running\" >&2; exit 1; fi"
    " && export TFDS_DATA_DIR=gs://bkt/tfds && export"
    " CLOUD_TPU_TASK_ID=$(curl -s -H Metadata-Flavor:Google"
    " http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
    "agent-worker-number) && { nohup .venv/bin/python -m conformer_fl.main"
    " --config=configs/central.py:size=S,corpus=librispeech"
    " --workdir=gs://bkt/cfl/central_S '--config.data.bucket_seconds=(8.0,)'"
    " > logs/central_S.worker$CLOUD_TPU_TASK_ID.log 2>&1 < /dev/null & } &&"
    " echo \"$(hostname): started central_S\"")

RUN_ARGS = ["--config=configs/central.py:size=S,corpus=librispeech",
            "--workdir=gs://bkt/cfl/central_S",
            "--config.data.bucket_seconds=(8.0,)"]


def _dry_run(*args) -> list[str]:
  out = io.StringIO()
  tpu_pod.main([args[0], "--dry-run", *args[1:]], out=out)
  lines = out.getvalue().splitlines()
  # Every line is one shell-quoted command that splits back into its argv.
  assert all(shlex.split(line) for line in lines)
  return lines


@pytest.fixture(autouse=True)
def no_subprocesses(monkeypatch):
  """A dry run never runs anything."""
  def fail(*args, **kwargs):
    raise AssertionError(f"ran a command: {args}")
  monkeypatch.setattr(tpu_pod.subprocess, "call", fail)
  monkeypatch.setattr(tpu_pod.subprocess, "run", fail)


def test_create():
  assert _dry_run("create", *POD, "--accelerator_type=v4-32",
                  "--runtime_version=tpu-ubuntu2204-base") == [
      "gcloud compute tpus queued-resources create cfl-v4 --node-id=cfl-v4"
      " --accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base"
      f" {LOCATION}"]
  # gcloud's hyphenated spellings work too; --spot; a node id of its own.
  assert _dry_run("create", "--name=cfl-v5e", "--zone=us-west4-a",
                  "--node-id=node-1", "--accelerator-type=v5litepod-16",
                  "--runtime-version=v2-alpha-tpuv5-lite", "--spot") == [
      "gcloud compute tpus queued-resources create cfl-v5e --node-id=node-1"
      " --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite"
      " --zone=us-west4-a --spot"]
  # --best-effort exists only in gcloud alpha.
  assert _dry_run("create", *POD, "--accelerator_type=v5p-8",
                  "--runtime_version=v2-alpha-tpuv5", "--best_effort") == [
      "gcloud alpha compute tpus queued-resources create cfl-v4"
      " --node-id=cfl-v4 --accelerator-type=v5p-8"
      f" --runtime-version=v2-alpha-tpuv5 {LOCATION} --best-effort"]


def test_wait_prints_the_state_query():
  assert _dry_run("wait", *POD) == [
      "gcloud compute tpus queued-resources describe cfl-v4"
      f" {LOCATION} '--format=value(state.state)'"]


def test_setup():
  assert _dry_run("setup", *POD, "--archive=/tmp/code.tar.gz") == [
      f"git -C {ROOT} archive --format=tar.gz --output=/tmp/code.tar.gz HEAD",
      "gcloud compute tpus tpu-vm scp /tmp/code.tar.gz"
      f" cfl-v4:conformer_fl.tar.gz {LOCATION} --worker=all",
      f"{SSH} --worker=all {shlex.quote('--command=' + SETUP_REMOTE)}"]
  # Default archive path, another ref; the corpus packages on request.
  lines = _dry_run("setup", *POD, "--ref=abc123", "--corpus_packages")
  assert lines[0] == (
      f"git -C {ROOT} archive --format=tar.gz"
      f" --output={tpu_pod.default_archive(tpu_pod.Pod('cfl-v4', 'x-y1-a'))}"
      " abc123")
  assert shlex.split(lines[2])[-1].startswith(
      "--command=(sudo apt-get -qq update && sudo"
      " DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3.11-venv"
      " espeak-ng flite fortunes-min fortunes bible-kjv) && mkdir -p"
      " conformer_fl")


def test_run():
  assert _dry_run("run", *POD, "--tfds_data_dir=gs://bkt/tfds", "--",
                  *RUN_ARGS) == [
      f"{SSH} --worker=all {shlex.quote('--command=' + RUN_REMOTE)}"]
  # --job names the log.
  lines = _dry_run("run", *POD, "--tfds_data_dir=gs://bkt/tfds",
                   "--job=first", "--", *RUN_ARGS)
  assert "> logs/first.worker$CLOUD_TPU_TASK_ID.log" in lines[0]


def test_run_several_in_sequence_in_one_background_shell():
  pod = tpu_pod.Pod("cfl-v4", "us-central2-b")
  [command] = tpu_pod.run_commands(pod, [
      ("a", ["--config=configs/central.py:seed=0", "--workdir=gs://b/a"]),
      ("b", ["--config=configs/central.py:seed=1", "--workdir=gs://b/b"]),
  ], "gs://b/tfds")
  assert command[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh",
                          "cfl-v4", "--zone=us-central2-b", "--worker=all"]
  queue = (".venv/bin/python -m conformer_fl.main"
           " --config=configs/central.py:seed=0 --workdir=gs://b/a >"
           " logs/a.worker$CLOUD_TPU_TASK_ID.log 2>&1; .venv/bin/python -m"
           " conformer_fl.main --config=configs/central.py:seed=1"
           " --workdir=gs://b/b > logs/b.worker$CLOUD_TPU_TASK_ID.log 2>&1")
  assert (f"&& {{ nohup sh -c {shlex.quote(queue)} > /dev/null 2>&1 <"
          " /dev/null & } && echo \"$(hostname): started 2 runs in sequence"
          " (a, b)\"") in command[-1]


def test_logs():
  assert _dry_run("logs", *POD, "--job=central_S") == [
      f"{SSH} --worker=0 '--command=tail -v -n 100"
      " conformer_fl/logs/central_S.worker*.log'"]
  assert _dry_run("logs", *POD, "--job=central_S", "--worker=all",
                  "--lines=20", "--follow") == [
      f"{SSH} --worker=all '--command=tail -v -n 20 -f"
      " conformer_fl/logs/central_S.worker*.log'"]
  assert _dry_run("logs", *POD) == [
      f"{SSH} --worker=0 '--command=tail -v -n 100 \"$(ls -t"
      " conformer_fl/logs/*.log | head -n 1)\"'"]


def test_delete():
  assert _dry_run("delete", *POD) == [
      "gcloud compute tpus queued-resources delete cfl-v4"
      f" {LOCATION} --force --quiet"]


@pytest.mark.parametrize("args, message", [
    (["create", "--name=", "--zone=us-central2-b", "--accelerator_type=v4-8",
      "--runtime_version=r"], "The pod name must not be empty"),
    (["create", "--name=My_TPU", "--zone=us-central2-b",
      "--accelerator_type=v4-8", "--runtime_version=r"],
     "Bad pod name 'My_TPU'"),
    (["delete", "--name=cfl", "--zone=uscentral"], "Bad zone 'uscentral'"),
    (["create", *POD, "--accelerator_type=v4", "--runtime_version=r"],
     "Bad accelerator type 'v4'"),
    (["create", *POD, "--accelerator_type=tpu-32", "--runtime_version=r"],
     "Bad accelerator type 'tpu-32'"),
    (["create", *POD, "--accelerator_type=v4-8", "--runtime_version="],
     "--runtime_version must not be empty"),
    (["create", *POD, "--accelerator_type=v4-8", "--runtime_version=r",
      "--spot", "--best_effort"], "Choose one of --spot and --best_effort"),
    (["run", *POD, "--tfds_data_dir=gs://b/t", "--",
      "--config=configs/central.py", "--workdir=/tmp/run"],
     "must be on GCS (gs://BUCKET/PATH), got '/tmp/run'"),
    (["run", *POD, "--tfds_data_dir=gs://b/t", "--",
      "--config=configs/central.py", "--workdir=gs://"],
     "must be on GCS (gs://BUCKET/PATH), got 'gs://'"),
    (["run", *POD, "--tfds_data_dir=gs://b/t", "--", "--workdir=gs://b/w"],
     "The run needs --config="),
    (["run", *POD, "--tfds_data_dir=gs://b/t", "--",
      "--config=configs/central.py"], "The run needs --workdir=gs://"),
    (["run", *POD, "--tfds_data_dir=", "--", *RUN_ARGS],
     "--tfds_data_dir must not be empty"),
    (["run", *POD, "--tfds_data_dir=gs://b/t", "--job=a b", "--", *RUN_ARGS],
     "Bad job name 'a b'"),
    (["logs", *POD, "--worker=two"], "Bad --worker 'two'"),
    (["logs", *POD, "--lines=0"], "--lines must be >= 1"),
    (["setup", *POD, "--python=python2"], "Bad --python 'python2'"),
])
def test_bad_inputs_raise_clear_errors(args, message):
  with pytest.raises(tpu_pod.LaunchError, match=message.replace(
      "(", r"\(").replace(")", r"\)").replace("*", r"\*")):
    tpu_pod.main([args[0], "--dry-run", *args[1:]], out=io.StringIO())


def test_run_passes_every_main_flag_through():
  [line] = _dry_run("run", *POD, "--tfds_data_dir=gs://bkt/tfds", "--",
                    *RUN_ARGS, "--log_dir=logs/absl", "--verbosity=1")
  assert (shlex.join([*RUN_ARGS, "--log_dir=logs/absl", "--verbosity=1"])
          + " > logs/central_S.worker$CLOUD_TPU_TASK_ID.log"
          ) in shlex.split(line)[-1]
  with pytest.raises(tpu_pod.LaunchError,
                     match="Unexpected argument 'stray' for conformer_fl.main"):
    tpu_pod.main(["run", *POD, "--tfds_data_dir=gs://b/t", "--", *RUN_ARGS,
                  "stray"])


def test_options_after_the_double_dash_are_refused():
  # --dry-run after -- would reach conformer_fl.main, not this script.
  with pytest.raises(tpu_pod.LaunchError, match="go before --"):
    tpu_pod.main(["run", *POD, "--tfds_data_dir=gs://b/t", "--", *RUN_ARGS,
                  "--dry-run"])


@pytest.mark.parametrize("args, message", [
    (["delete", "--zone=us-central2-b"], "`delete` needs --name "),
    (["create", *POD, "--runtime_version=r"],
     "`create` needs --accelerator_type "),
    (["run", *POD, "--", *RUN_ARGS], "`run` needs --tfds_data_dir "),
    (["plan", "--", *RUN_ARGS], "`plan` needs --topology "),
    (["delete", *POD, "--spot"], "--spot is not a flag of `delete`; its flags"
     " are --dry_run, --name, --node_id, --project, --zone."),
    (["logs", *POD, "--topology=v5e:2x2"], "--topology is not a flag of"),
    ([*POD], "Give a subcommand first, one of create, wait, setup, run, logs,"
     " delete, plan"),
    (["destroy", *POD], "Unknown subcommand 'destroy'"),
    (["delete", "now", *POD], r"Unexpected arguments \['now'\]"),
    (["delete", *POD, "--", "--force"], "`delete` takes no arguments after"),
])
def test_each_subcommand_takes_its_own_flags(args, message):
  with pytest.raises(tpu_pod.LaunchError, match=message):
    tpu_pod.main(args, out=io.StringIO())


def test_flags_may_come_before_the_subcommand():
  out = io.StringIO()
  tpu_pod.main(["--dry-run", *POD, "delete"], out=out)
  assert out.getvalue().splitlines() == _dry_run("delete", *POD)


def test_execute_stops_at_the_first_failure(monkeypatch):
  monkeypatch.undo()  # Really run `true` and `false`.
  tpu_pod.execute([["true"]], dry_run=False)
  ran, real_call = [], subprocess.call
  monkeypatch.setattr(tpu_pod.subprocess, "call",
                      lambda c, cwd=None: ran.append(c) or real_call(c))
  with pytest.raises(tpu_pod.LaunchError,
                     match="Command failed with exit code 1: false"):
    tpu_pod.execute([["true"], ["false"], ["true"]], dry_run=False)
  assert ran == [["true"], ["false"]]
  with pytest.raises(tpu_pod.LaunchError, match="is it installed"):
    tpu_pod.execute([["no-such-binary-xyz"]], dry_run=False)


def test_remote_run_command_starts_the_job_in_the_background(tmp_path,
                                                             monkeypatch):
  monkeypatch.undo()
  home = tmp_path / "home"
  (home / "conformer_fl" / ".venv" / "bin").mkdir(parents=True)
  (home / "bin").mkdir()
  python = home / "conformer_fl" / ".venv" / "bin" / "python"
  python.write_text("#!/bin/sh\necho \"args: $*\"\n"
                    "echo \"TFDS_DATA_DIR=$TFDS_DATA_DIR\"\n"
                    "echo \"CLOUD_TPU_TASK_ID=$CLOUD_TPU_TASK_ID\"\n")
  curl = home / "bin" / "curl"  # The metadata server says: worker 3.
  curl.write_text("#!/bin/sh\necho 3\n")
  for path in (python, curl):
    path.chmod(0o755)
  # Only this test's stand-in counts as a running job (the machine is shared).
  monkeypatch.setattr(tpu_pod, "_RUNNING_PATTERN",
                      f"^/bin/sh [.]venv/bin/python -m conformer_fl[.]main"
                      f" --config=none-{os.getpid()}")
  remote = tpu_pod.run_remote_command([("job1", RUN_ARGS)], "gs://b/t d")
  env = {"HOME": str(home), "PATH": f"{home / 'bin'}:/usr/bin:/bin"}
  result = subprocess.run(["bash", "-c", remote], cwd=home, env=env,
                          capture_output=True, text=True, timeout=30,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.endswith(": started job1\n")
  log = home / "conformer_fl" / "logs" / "job1.worker3.log"
  for _ in range(100):
    if log.exists() and log.read_text().count("\n") == 3:
      break
    time.sleep(0.1)
  assert log.read_text().splitlines() == [
      "args: -m conformer_fl.main " + " ".join(RUN_ARGS),
      "TFDS_DATA_DIR=gs://b/t d",
      "CLOUD_TPU_TASK_ID=3",
  ]
