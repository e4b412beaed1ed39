r"""Cloud TPU VM pods through gcloud: create, wait, setup, run, logs, delete.

A pod slice (e.g. v4-32: 4 hosts) runs the same command on every host; inside
it, `conformer_fl.main` calls `jax.distributed.initialize()`, which finds the
other hosts from the TPU metadata server. The workdir must be on GCS (every
host writes to it), and TFDS datasets (LibriSpeech) are read from
$TFDS_DATA_DIR, usually a gs:// folder too.

  P="--name=cfl-v4 --zone=us-central2-b --project=my-project"
  python launch/tpu_pod.py create $P --accelerator_type=v4-32 \
      --runtime_version=tpu-ubuntu2204-base [--spot | --best_effort]
  python launch/tpu_pod.py wait $P            # polls until the pod is ACTIVE
  python launch/tpu_pod.py setup $P           # code + virtualenv, every worker
  python launch/tpu_pod.py run $P --tfds_data_dir=gs://BUCKET/tfds -- \
      --config=configs/central.py:size=S,corpus=librispeech \
      --workdir=gs://BUCKET/cfl/central_S
  python launch/tpu_pod.py logs $P --job=central_S [--worker=all] [--follow]
  python launch/tpu_pod.py delete $P          # the queued resource and its node

Before renting the pod, `plan` compiles the run's step for the pod's TPU
topology on this machine (no pod, no gcloud: `pip install -e '.[tpu-plan]'`
brings libtpu) and prints HBM per chip, the most clients (or examples, or
variants) per chip that fit and the compiled FLOPs; it exits 1, naming the
config field, when the config does not divide over the chips or does not fit
(`conformer_fl/tools/pod_plan.py`). It takes the flags of `run` (the pod's are
optional and unused) and --topology:

  python launch/tpu_pod.py plan --topology=v5e:2x2 -- \
      --config=configs/federated.py:size=S,corpus=librispeech

The subcommand is the first argument that is not a flag; the flags are absl
flags, each --a_b also spelled --a-b (`--help` lists them, with the
subcommands that take each). A flag the subcommand needs but is not given, or
one it does not take, ends the script with one line `error: ...` naming the
flag, exit status 1, as every bad input does.

Every subcommand takes --dry-run: it prints the exact commands, one per line
(shell-quoted), instead of running them (`plan --dry-run` prints the step it
would compile, its shapes and chips, and compiles nothing). Otherwise they run
one after another and the first failure stops the script with the failing
command. After --, `run` passes every flag to `conformer_fl.main` (absl's
--log_dir too) but this script's own options, which go before --.

On each worker: `setup` ships the committed tree (`git archive` of --ref,
default HEAD: commit or stash what you want to run) to ~/conformer_fl and
installs the package with `jax[tpu]` into ~/conformer_fl/.venv (Python 3.11,
from apt when missing). `run` starts `python -m conformer_fl.main` with nohup
in the background on every worker at once, with TFDS_DATA_DIR and
CLOUD_TPU_TASK_ID (the worker number, from the metadata server) exported: a
TPU VM's ssh session has neither TPU_WORKER_HOSTNAMES nor CLOUD_TPU_TASK_ID,
and `conformer_fl.main` calls `jax.distributed.initialize()` only when one of
them is set. Each worker logs to ~/conformer_fl/logs/JOB.workerN.log. `run`
refuses to start while a conformer_fl.main job is still running on a worker.
"""

from collections.abc import Sequence
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # Run from a checkout without installing.
# pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl import cli
# pylint: enable=g-import-not-at-top,wrong-import-position
# On every worker, relative to the home directory (ssh sessions start there).
REMOTE_DIR = "conformer_fl"
REMOTE_ARCHIVE = "conformer_fl.tar.gz"
LOG_DIR = "logs"  # Inside REMOTE_DIR.
DEFAULT_PYTHON = "python3.11"  # setup.py: python_requires >= 3.11.
CORPUS_PACKAGES = ("espeak-ng", "flite", "fortunes-min", "fortunes",
                   "bible-kjv")  # Local corpus only.
WORKER_NUMBER_URL = ("http://metadata.google.internal/computeMetadata/v1/"
                     "instance/attributes/agent-worker-number")
# A process whose command line starts with a python binary running the entry
# point (the remote shell that runs this check does not start that way).
_RUNNING_PATTERN = "^[^ ]*python[^ ]* -m conformer_fl[.]main"

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_ACCELERATOR = re.compile(r"^v[0-9]+[a-z]*-[0-9]+$")
_JOB = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")
_WORKER = re.compile(r"^(all|[0-9]+(,[0-9]+)*)$")
_PYTHON = re.compile(r"^python3(\.[0-9]+)?$")

Command = list[str]


class LaunchError(ValueError):
  """A bad input, or a command that failed."""


@dataclasses.dataclass(frozen=True)
class Pod:
  """A queued resource and its TPU VM node.

  Attributes:
    name: queued-resource name.
    zone: e.g. us-central2-b.
    project: GCP project; None = gcloud's default project.
    node_id: the TPU VM node; None = `name`.
  """
  name: str
  zone: str
  project: str | None = None
  node_id: str | None = None

  def __post_init__(self):
    for field, value in (("name", self.name), ("node_id", self.node_id)):
      if field == "node_id" and value is None:
        continue
      if not value:
        raise LaunchError(f"The pod {field} must not be empty.")
      if not _NAME.match(value):
        raise LaunchError(
            f"Bad pod {field} {value!r}: lower-case letters, digits and"
            " hyphens, starting with a letter, at most 63 characters.")
    if not self.zone or not _ZONE.match(self.zone):
      raise LaunchError(f"Bad zone {self.zone!r}: expected e.g. us-central2-b.")
    if self.project is not None and not self.project:
      raise LaunchError("--project must not be empty (omit it for gcloud's"
                        " default project).")

  @property
  def node(self) -> str:
    return self.node_id or self.name

  def location_flags(self) -> list[str]:
    flags = [f"--zone={self.zone}"]
    if self.project:
      flags.append(f"--project={self.project}")
    return flags


# ----------------------------------------------------------------------------
# Input checks.


def check_accelerator_type(accelerator_type: str) -> str:
  if not _ACCELERATOR.match(accelerator_type or ""):
    raise LaunchError(
        f"Bad accelerator type {accelerator_type!r}: expected VERSION-CORES,"
        " e.g. v4-32, v5p-16, v5litepod-16, v6e-8.")
  return accelerator_type


def check_gcs_workdir(workdir: str) -> str:
  """A pod's workdir: every host writes there, so it must be gs://BUCKET/..."""
  if not workdir.startswith("gs://") or len(workdir.rstrip("/")) <= len(
      "gs://") or workdir[len("gs://")] == "/":
    raise LaunchError(
        f"The workdir of a pod run must be on GCS (gs://BUCKET/PATH), got"
        f" {workdir!r}: every host of the pod writes to it.")
  return workdir


def check_job(job: str) -> str:
  if not _JOB.match(job or ""):
    raise LaunchError(f"Bad job name {job!r}: letters, digits and ._=- only.")
  return job


def check_worker(worker: str) -> str:
  if not _WORKER.match(worker or ""):
    raise LaunchError(
        f"Bad --worker {worker!r}: 'all' or worker numbers such as 0 or 0,1.")
  return worker


def _flag_value(args: Sequence[str], name: str) -> str | None:
  prefix = f"--{name}="
  values = [a[len(prefix):] for a in args if a.startswith(prefix)]
  return values[-1] if values else None


def check_main_args(main_args: Sequence[str]) -> None:
  """`conformer_fl.main` arguments for a pod: a config and a gs:// workdir."""
  if not _flag_value(main_args, "config"):
    raise LaunchError(
        "The run needs --config=configs/NAME.py[:ARG] (after --).")
  workdir = _flag_value(main_args, "workdir")
  if not workdir:
    raise LaunchError("The run needs --workdir=gs://BUCKET/PATH (after --).")
  check_gcs_workdir(workdir)
  check_main_flags(main_args, example_option="--dry-run")


# The options of this script (both spellings): after --, one is a mistake.
OWN_OPTIONS = frozenset(
    spelling for name in (
        "name", "zone", "project", "node_id", "dry_run", "accelerator_type",
        "runtime_version", "spot", "best_effort", "timeout_minutes",
        "poll_seconds", "ref", "archive", "python", "corpus_packages",
        "tfds_data_dir", "job", "topology", "no_search", "max_compiles",
        "worker", "lines", "follow")
    for spelling in (name, name.replace("_", "-")))


def check_main_flags(main_args: Sequence[str], example_option: str) -> None:
  """Refuses after -- what conformer_fl.main cannot take: anything that is
  not a flag, and the options of this script. Every other flag passes
  through (--config..., --workdir, absl's --log_dir, --verbosity, ...)."""
  for arg in main_args:
    name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
    if name is None or name in OWN_OPTIONS:
      raise LaunchError(
          f"Unexpected argument {arg!r} for conformer_fl.main: it takes flags"
          " (--config=..., --workdir=..., --config.FIELD=VALUE, absl flags"
          " such as --log_dir=DIR); the options of tpu_pod.py, such as"
          f" {example_option}, go before --.")


def main_flags_for_plan(main_args: Sequence[str]) -> list[str]:
  """The flags of `main_args` that decide what is compiled (--config...,
  --workdir); the plan leaves out the others (logging and the like)."""
  return [a for a in main_args
          if a.startswith(("--config=", "--config.", "--workdir="))]


def default_job_name(main_args: Sequence[str]) -> str:
  """The workdir's last component: central_S for gs://b/cfl/central_S."""
  workdir = _flag_value(main_args, "workdir") or ""
  return workdir.rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------
# Commands.

_GCLOUD_TPUS = ["gcloud", "compute", "tpus"]


def create_commands(pod: Pod, accelerator_type: str, runtime_version: str,
                    spot: bool = False,
                    best_effort: bool = False) -> list[Command]:
  """The queued-resource request (--best_effort exists only in gcloud alpha)."""
  check_accelerator_type(accelerator_type)
  if not runtime_version:
    raise LaunchError("--runtime_version must not be empty (e.g."
                      " tpu-ubuntu2204-base, v2-alpha-tpuv5-lite).")
  if spot and best_effort:
    raise LaunchError("Choose one of --spot and --best_effort.")
  gcloud = (["gcloud", "alpha", "compute", "tpus"] if best_effort
            else _GCLOUD_TPUS)
  command = [*gcloud, "queued-resources", "create", pod.name,
             f"--node-id={pod.node}", f"--accelerator-type={accelerator_type}",
             f"--runtime-version={runtime_version}", *pod.location_flags()]
  if spot:
    command.append("--spot")
  if best_effort:
    command.append("--best-effort")
  return [command]


def describe_command(pod: Pod) -> Command:
  """Prints the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, ...)."""
  return [*_GCLOUD_TPUS, "queued-resources", "describe", pod.name,
          *pod.location_flags(), "--format=value(state.state)"]


def ssh_command(pod: Pod, remote: str, worker: str = "all") -> Command:
  return [*_GCLOUD_TPUS, "tpu-vm", "ssh", pod.node, *pod.location_flags(),
          f"--worker={check_worker(worker)}", f"--command={remote}"]


def default_archive(pod: Pod) -> str:
  return os.path.join(tempfile.gettempdir(), f"conformer_fl-{pod.name}.tar.gz")


def setup_remote_command(python: str = DEFAULT_PYTHON,
                         corpus_packages: bool = False) -> str:
  """The shell command each worker runs: unpack, virtualenv, install."""
  if not _PYTHON.match(python):
    raise LaunchError(f"Bad --python {python!r}: expected e.g. python3.11.")
  packages = [f"{python}-venv", *(CORPUS_PACKAGES if corpus_packages else ())]
  apt = ("sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive"
         f" apt-get -qq install -y {' '.join(packages)}")
  steps = [
      (f"({apt})" if corpus_packages else
       f"({python} -c 'import ensurepip' 2>/dev/null || ({apt}))"),
      f"mkdir -p {REMOTE_DIR}",
      f"cd {REMOTE_DIR}",
      # A fresh tree, keeping the virtualenv and the logs.
      f"find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name {LOG_DIR}"
      " -exec rm -rf {} +",
      f"tar -xzf ../{REMOTE_ARCHIVE}",
      f"{python} -m venv .venv",
      ".venv/bin/pip install -q --upgrade pip",
      ".venv/bin/pip install -q -e . 'jax[tpu]'",
      ".venv/bin/python -c 'import jax, conformer_fl; print(\"jax\","
      " jax.__version__)'",
  ]
  return " && ".join(steps)


def setup_commands(pod: Pod, ref: str = "HEAD", archive: str | None = None,
                   python: str = DEFAULT_PYTHON,
                   corpus_packages: bool = False) -> list[Command]:
  """git archive of `ref` -> every worker; then each worker's virtualenv."""
  if not ref:
    raise LaunchError("--ref must not be empty (e.g. HEAD or a commit).")
  archive = archive or default_archive(pod)
  return [
      ["git", "-C", ROOT, "archive", "--format=tar.gz", f"--output={archive}",
       ref],
      [*_GCLOUD_TPUS, "tpu-vm", "scp", archive, f"{pod.node}:{REMOTE_ARCHIVE}",
       *pod.location_flags(), "--worker=all"],
      ssh_command(pod, setup_remote_command(python, corpus_packages)),
  ]


def log_file(job: str) -> str:
  """A worker's log of `job`, relative to REMOTE_DIR."""
  return f"{LOG_DIR}/{check_job(job)}.worker$CLOUD_TPU_TASK_ID.log"


def _main_command(main_args: Sequence[str]) -> str:
  return shlex.join([".venv/bin/python", "-m", "conformer_fl.main", *main_args])


def run_remote_command(runs: Sequence[tuple[str, Sequence[str]]],
                       tfds_data_dir: str) -> str:
  """The shell command each worker runs: start `runs` in the background.

  Args:
    runs: (job name, `conformer_fl.main` arguments) pairs. One run is started
      with nohup; several run one after another in one background shell (a
      failed run does not stop the next: each has its own log).
    tfds_data_dir: exported as TFDS_DATA_DIR.
  """
  if not runs:
    raise LaunchError("Nothing to run.")
  if not tfds_data_dir:
    raise LaunchError("--tfds_data_dir must not be empty: TFDS datasets"
                      " (LibriSpeech) are read from it, e.g. gs://BUCKET/tfds.")
  jobs = [check_job(job) for job, _ in runs]
  if len(set(jobs)) != len(jobs):
    raise LaunchError(f"Job names must differ, got {jobs}.")
  for _, main_args in runs:
    check_main_args(main_args)
  if len(runs) == 1:
    job, main_args = runs[0]
    background = f"nohup {_main_command(main_args)} > {log_file(job)} 2>&1"
    started = job
  else:
    queue = "; ".join(f"{_main_command(args)} > {log_file(job)} 2>&1"
                      for job, args in runs)
    background = f"nohup sh -c {shlex.quote(queue)} > /dev/null 2>&1"
    started = f"{len(runs)} runs in sequence ({', '.join(jobs)})"
  return " && ".join([
      f"cd {REMOTE_DIR}",
      f"mkdir -p {LOG_DIR}",
      f"if pgrep -f '{_RUNNING_PATTERN}' > /dev/null; then echo \"$(hostname):"
      " a conformer_fl.main job is still running\" >&2; exit 1; fi",
      f"export TFDS_DATA_DIR={shlex.quote(tfds_data_dir)}",
      "export CLOUD_TPU_TASK_ID=$(curl -s -H Metadata-Flavor:Google"
      f" {WORKER_NUMBER_URL})",
      f"{{ {background} < /dev/null & }}",
      f"echo \"$(hostname): started {started}\"",
  ])


def run_commands(pod: Pod, runs: Sequence[tuple[str, Sequence[str]]],
                 tfds_data_dir: str) -> list[Command]:
  """Starts `runs` (see run_remote_command) on every worker at once."""
  return [ssh_command(pod, run_remote_command(runs, tfds_data_dir), "all")]


def logs_commands(pod: Pod, job: str | None = None, worker: str = "0",
                  lines: int = 100, follow: bool = False) -> list[Command]:
  """Tails the log of `job` (None = the newest log) on `worker`."""
  if lines < 1:
    raise LaunchError(f"--lines must be >= 1, got {lines}.")
  if job is None:
    target = f"\"$(ls -t {REMOTE_DIR}/{LOG_DIR}/*.log | head -n 1)\""
  else:
    target = f"{REMOTE_DIR}/{LOG_DIR}/{check_job(job)}.worker*.log"
  follow_flag = " -f" if follow else ""
  return [ssh_command(pod, f"tail -v -n {lines}{follow_flag} {target}", worker)]


def delete_commands(pod: Pod) -> list[Command]:
  """Deletes the queued resource; --force deletes its node first."""
  return [[*_GCLOUD_TPUS, "queued-resources", "delete", pod.name,
           *pod.location_flags(), "--force", "--quiet"]]


def plan_run(main_args: Sequence[str], topology: str, search: bool = True,
             max_compiles: int = 4, out=None, dry_run: bool = False) -> None:
  """Prints the plan of `conformer_fl.main main_args` on `topology`.

  Compiles on this machine's CPU (JAX_PLATFORMS=cpu unless set): see
  `conformer_fl.tools.pod_plan`. With `dry_run`, prints what it would compile
  (`pod_plan.describe`) and compiles nothing.

  Raises:
    LaunchError: the package or libtpu is missing, or the config does not
      divide over the chips or fit (the message names the config field).
  """
  main_args = list(main_args)
  if main_args and main_args[0] == "--":
    main_args = main_args[1:]
  check_main_flags(main_args, example_option="--topology")
  main_args = main_flags_for_plan(main_args)
  if max_compiles < 1:
    raise LaunchError(f"--max_compiles must be >= 1, got {max_compiles}.")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  try:
    # pylint: disable-next=g-import-not-at-top
    from conformer_fl.tools import pod_plan
  except ImportError as e:
    raise LaunchError(
        f"`plan` needs the conformer_fl package and its dependencies ({e}):"
        " pip install -e '.[tpu-plan]'.") from e
  try:
    if dry_run:
      print(pod_plan.describe(main_args, topology, search=search,
                              max_compiles=max_compiles),
            file=out or sys.stdout, flush=True)
      return
    plan = pod_plan.plan(
        main_args, topology, search=search, max_compiles=max_compiles,
        log=lambda line: print(f"plan: {line}", file=sys.stderr, flush=True))
  except pod_plan.PlanError as e:
    raise LaunchError(str(e)) from e
  print(pod_plan.format_plan(plan), file=out or sys.stdout, flush=True)


# ----------------------------------------------------------------------------
# Running them.


def execute(commands: Sequence[Command], dry_run: bool, out=None,
            cwd: str | None = None) -> None:
  """Prints (dry_run) or runs `commands` in `cwd`, up to the first failure.

  Raises:
    LaunchError: a command exited non-zero or could not be started.
  """
  out = out or sys.stdout
  for command in commands:
    line = shlex.join(command)
    if dry_run:
      print(line, file=out)
      continue
    print(f"+ {line}", file=sys.stderr, flush=True)
    try:
      code = subprocess.call(command, cwd=cwd)
    except FileNotFoundError as e:
      raise LaunchError(f"Cannot run {command[0]!r} ({e}); is it installed and"
                        " on PATH? (gcloud: the Google Cloud SDK)") from e
    if code:
      raise LaunchError(f"Command failed with exit code {code}: {line}")


def wait_until_active(pod: Pod, dry_run: bool, timeout_minutes: float = 60.0,
                      poll_seconds: float = 30.0, out=None) -> None:
  """Polls the queued resource until ACTIVE.

  Raises:
    LaunchError: the request FAILED or was SUSPENDED, or the timeout passed.
  """
  command = describe_command(pod)
  if dry_run:
    execute([command], dry_run=True, out=out)
    return
  deadline = time.monotonic() + timeout_minutes * 60
  while True:
    try:
      result = subprocess.run(command, capture_output=True, text=True,
                              check=False)
    except FileNotFoundError as e:
      raise LaunchError(f"Cannot run gcloud ({e}); install the Google Cloud"
                        " SDK.") from e
    if result.returncode:
      raise LaunchError(f"Command failed with exit code {result.returncode}:"
                        f" {shlex.join(command)}\n{result.stderr.strip()}")
    state = result.stdout.strip()
    print(f"{pod.name}: {state}", file=sys.stderr, flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
      raise LaunchError(f"Queued resource {pod.name} is {state}; see `gcloud"
                        f" compute tpus queued-resources describe {pod.name}"
                        f" --zone={pod.zone}`.")
    if time.monotonic() > deadline:
      raise LaunchError(f"Queued resource {pod.name} is still {state} after"
                        f" {timeout_minutes} minutes.")
    time.sleep(poll_seconds)


# ----------------------------------------------------------------------------
# Command line.


SUBCOMMANDS = ("create", "wait", "setup", "run", "logs", "delete", "plan")
_POD = ("project", "node_id", "dry_run")  # Beside --name and --zone.
# Per subcommand: (the flags it needs, the other flags it takes).
SUBCOMMAND_FLAGS = {
    "create": (("name", "zone", "accelerator_type", "runtime_version"),
               (*_POD, "spot", "best_effort")),
    "wait": (("name", "zone"), (*_POD, "timeout_minutes", "poll_seconds")),
    "setup": (("name", "zone"),
              (*_POD, "ref", "archive", "python", "corpus_packages")),
    "run": (("name", "zone", "tfds_data_dir"), (*_POD, "job")),
    "logs": (("name", "zone"), (*_POD, "job", "worker", "lines", "follow")),
    "delete": (("name", "zone"), _POD),
    # The pod's flags are optional and unused: the flags of `run` work as is.
    "plan": (("topology",), ("name", "zone", "project", "node_id",
                             "tfds_data_dir", "job", "dry_run", "no_search",
                             "max_compiles")),
}
# The subcommands that pass the arguments after -- to conformer_fl.main.
TAKES_MAIN_ARGS = ("run", "plan")


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of every subcommand (absl); each --a_b is also --a-b, as
  gcloud spells its flags. `check_subcommand` says which one takes which."""

  def define(kind, name: str, default, help_string: str, **kwargs) -> None:
    kind(name, default, help_string, flag_values=flag_values, **kwargs)
    if "_" in name:
      flags.DEFINE_alias(name.replace("_", "-"), name,
                         flag_values=flag_values)

  string, boolean = flags.DEFINE_string, flags.DEFINE_bool
  define(string, "name", None, "Queued-resource name.")
  define(string, "zone", None, "e.g. us-central2-b.")
  define(string, "project", None, "Default: gcloud's project.")
  define(string, "node_id", None, "TPU VM node; default: --name.")
  define(boolean, "dry_run", False,
         "Print the commands instead of running them (plan: print what would"
         " be compiled, its step, shapes and chips, and compile nothing).")
  # create
  define(string, "accelerator_type", None, "create: e.g. v4-32.")
  define(string, "runtime_version", None, "create: e.g. tpu-ubuntu2204-base"
         " (v4), v2-alpha-tpuv5-lite (v5e).")
  define(boolean, "spot", False, "create: a Spot request.")
  define(boolean, "best_effort", False, "create: a best-effort request.")
  # wait
  define(flags.DEFINE_float, "timeout_minutes", 60.0,
         "wait: give up after this long.")
  define(flags.DEFINE_float, "poll_seconds", 30.0, "wait: poll interval.")
  # setup
  define(string, "ref", "HEAD", "setup: the git commit to ship.")
  define(string, "archive", None, "setup: local path of the tarball.")
  define(string, "python", DEFAULT_PYTHON, "setup: the workers' Python.")
  define(boolean, "corpus_packages", False,
         f"setup: also apt-get {' '.join(CORPUS_PACKAGES)} (the local"
         " corpus).")
  # run (and plan, unused there)
  define(string, "tfds_data_dir", None,
         "run: exported as TFDS_DATA_DIR, e.g. gs://BUCKET/tfds.")
  define(string, "job", None, "run: the log's name; default: the workdir's"
         " name. logs: the job; default: the newest log.")
  # plan
  define(string, "topology", None,
         "plan: TPU topology, e.g. v5e:2x2 (v5litepod-4), v5e:4x4, v4:2x2x1"
         " (v4-8), v4:2x2x2, v5p:2x2x1, v6e:2x2; or cpu (this machine).")
  define(boolean, "no_search", False,
         "plan: compile the config's own count only (no max-per-chip"
         " search).")
  define(flags.DEFINE_integer, "max_compiles", 4,
         "plan: at most this many compilations in the search.")
  # logs
  define(string, "worker", "0", "logs: 0, 1, ... or all.")
  define(flags.DEFINE_integer, "lines", 100, "logs: lines to show.")
  define(boolean, "follow", False, "logs: keep following the log.")


def check_subcommand(args: cli.ScriptArgs) -> str:
  """The subcommand (the first argument that is not a flag), checked.

  Raises:
    LaunchError: no or an unknown subcommand, a flag it needs missing, a flag
      it does not take given, or arguments after -- for one that passes none.
  """
  if not args.positional:
    raise LaunchError(
        f"Give a subcommand first, one of {', '.join(SUBCOMMANDS)} (e.g."
        " tpu_pod.py delete --name=N --zone=Z).")
  subcommand, *extra = args.positional
  if subcommand not in SUBCOMMAND_FLAGS:
    raise LaunchError(f"Unknown subcommand {subcommand!r}: one of"
                      f" {', '.join(SUBCOMMANDS)}.")
  if extra:
    raise LaunchError(
        f"Unexpected arguments {extra}: `{subcommand}` takes flags; the"
        " arguments of conformer_fl.main (run, plan) go after --.")
  required, optional = SUBCOMMAND_FLAGS[subcommand]
  for name in required:
    if not args.flags[name].present:
      raise LaunchError(f"`{subcommand}` needs --{name} (--help describes"
                        " it).")
  taken = {*required, *optional}
  for name in sorted({n for names in SUBCOMMAND_FLAGS.values()
                      for group in names for n in group} - taken):
    if args.flags[name].present:
      raise LaunchError(
          f"--{name} is not a flag of `{subcommand}`; its flags are"
          f" {', '.join('--' + n for n in sorted(taken))}.")
  if args.after_dashes and subcommand not in TAKES_MAIN_ARGS:
    raise LaunchError(f"`{subcommand}` takes no arguments after --, got"
                      f" {args.after_dashes}.")
  return subcommand


def parse_command_line(argv: Sequence[str]) -> cli.ScriptArgs:
  """`argv` (program name first) parsed in a FlagValues of its own."""
  return cli.parse_script_flags(argv, define_flags, positional=True,
                                after_dashes=True)


def run_command_line(args: cli.ScriptArgs, out=None) -> None:
  """Runs (or prints) one subcommand.

  Raises:
    LaunchError: bad input or a failed command (run as a script, one line).
  """
  subcommand = check_subcommand(args)
  f = args.flags
  if subcommand == "plan":
    plan_run(args.after_dashes, f.topology, search=not f.no_search,
             max_compiles=f.max_compiles, out=out, dry_run=f.dry_run)
    return
  pod = Pod(f.name, f.zone, f.project, f.node_id)
  if subcommand == "create":
    commands = create_commands(pod, f.accelerator_type, f.runtime_version,
                               f.spot, f.best_effort)
  elif subcommand == "wait":
    wait_until_active(pod, f.dry_run, f.timeout_minutes, f.poll_seconds,
                      out=out)
    return
  elif subcommand == "setup":
    commands = setup_commands(pod, f.ref, f.archive, f.python,
                              f.corpus_packages)
  elif subcommand == "run":
    main_args = args.after_dashes
    check_main_args(main_args)
    job = f.job or default_job_name(main_args)
    commands = run_commands(pod, [(job, main_args)], f.tfds_data_dir)
  elif subcommand == "logs":
    commands = logs_commands(pod, f.job, f.worker, f.lines, f.follow)
  else:
    commands = delete_commands(pod)
  execute(commands, f.dry_run, out=out)


def main(argv: Sequence[str], out=None) -> None:
  """The command line `tpu_pod.py ARGV...`, run in this process.

  Raises:
    LaunchError: as run_command_line. A flag that does not parse ends the
      program (`cli.fail`).
  """
  run_command_line(parse_command_line(["tpu_pod.py", *argv]), out=out)


if __name__ == "__main__":
  cli.run_script(run_command_line, define_flags, errors=(LaunchError,),
                 positional=True, after_dashes=True)
