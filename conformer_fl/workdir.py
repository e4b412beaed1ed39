"""What a workdir holds on to: the config that made it, and who runs in it.

`Workdir` names the files of a run's workdir (config.json, metrics.jsonl,
eval_samples.txt, final_eval.json, checkpoints/, analysis/) and reads its
config and metrics; every module that reads or writes one of them takes its
path from there. A workdir may be local or on GCS (`gs://...`): its files are
read through `etils.epath`.

Every training run (central, federated and the experiment) opens its workdir
through this module before it writes anything:

1. `check_is_directory`: a `--workdir` that is a file is named as such.
2. `check_config`: the workdir remembers the config that made it
   (`config.json`; the experiment's `experiment_config.json`). A rerun may
   change only the fields of `RESUMABLE_FIELDS` (for the experiment,
   `EXPERIMENT_RESUMABLE_FIELDS`); any other difference is refused with
   `ConfigChangedError`, naming each field and both values, before any file is
   written. A field that only one side has (the code added or removed a
   config field since the workdir was made) is not a difference: it is named
   in a warning and the run resumes, so that updating the code does not lock
   out every existing workdir.
3. `WorkdirLock`: process 0 holds `<workdir>/.lock` for the life of the run.
   The lock is a `filelock.FileLock` (an flock) on that file, which the
   kernel releases when the process dies, and the file records the holder's
   PID, host and start time. A second run on the workdir is refused with
   `WorkdirLockedError` naming the holder. A lock left by a killed run (the
   file still names it, but no process holds the flock) is taken over with a
   warning. A lock written on another host cannot be checked from here (a
   shared file system may not carry flocks between hosts): it is refused
   unless the environment variable CONFORMER_FL_TAKE_OVER_LOCK=1 says that run
   is gone. On a file system without flock, the record alone decides: a live
   process of this host in it holds the lock. Workdirs on GCS (`gs://...`)
   are not locked: etils.epath offers no atomic create-if-absent or file lock
   there; run one job per workdir (`launch/tpu_pod.py run` refuses a second
   job on a pod). A workdir that cannot be written (read-only, immutable, or
   on a read-only file system) is refused with `WorkdirNotWritableError` when
   the lock file is made, the run's first write.

`RunError` is the base of the errors that stop or refuse a run for a reason
the user can act on; the entry point (`conformer_fl/main.py`) prints its
one-line message and exits with status 1.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import datetime
import errno
import fnmatch
import functools
import json
import os
import socket
import sys
from typing import Any

from absl import logging
from etils import epath
import filelock
import ml_collections

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "eval_samples.txt"
FINAL_EVAL_FILE = "final_eval.json"
CHECKPOINTS_DIR = "checkpoints"
ANALYSIS_DIR = "analysis"
LOCK_FILE = ".lock"
TAKE_OVER_ENV = "CONFORMER_FL_TAKE_OVER_LOCK"

# The fields of a central or federated run's config that a rerun on the same
# workdir may change: they say how long to train, when to log, evaluate and
# save, where the data and the pre-trained run are read from, and how the
# evaluation is batched, never what the parameters are. Patterns of dotted
# field names (fnmatch). Every other field is compared with config.json.
RESUMABLE_FIELDS = (
    # How long: a finished run may be continued for more steps or rounds.
    "central.num_steps",
    "federated.rounds",
    # Cadences of logging, evaluation and checkpoints.
    "central.log_every",
    "central.eval_every",
    "central.checkpoint_every",
    "federated.log_every",
    "federated.eval_every",
    "federated.checkpoint_every",
    # How many devices a central step is split over (same model and data;
    # only the order of the gradient sums changes).
    "central.num_devices",
    # Where the corpus and the pre-trained run are (another machine or
    # $TFDS_DATA_DIR; init_workdir is read for round 0 only, which the
    # workdir's own checkpoints already hold).
    "data.data_dir",
    "federated.init_workdir",
    # Evaluation and input prefetching, which do not touch the parameters.
    "eval_max_batches",
    "data.eval_batch_size",
    "data.prefetch_batches",
    # How faults are handled: whether a checkpoint without checksums may be
    # restored, and the loss-explosion guard's thresholds.
    "allow_unverified_checkpoints",
    "loss_guard.*",
)

# Fields a run derives rather than takes from the command line: config.json
# holds the derived value, the given config the default. model.vocab_size is
# the tokenizer's (whose data.tokenizer fields are compared).
DERIVED_FIELDS = ("model.vocab_size",)

# The experiment reuses a finished stage by its step count and compares the
# arms of one config in its report, so only where the corpus is may change.
EXPERIMENT_RESUMABLE_FIELDS = ("data_dir", "*.data_dir")
# Fields a rerun of the experiment may add or drop without a word: its
# stability runs (claims 2 and 3, under W/stability), so that a workdir of
# `make demo` grows by them and reuses every other stage. A run present in both
# configs must be the same.
EXPERIMENT_GROWABLE_FIELDS = ("stability.runs.*",)


class RunError(Exception):
  """A run refused or stopped for a reason the user can act on (one line)."""


class WorkdirError(RunError):
  """The workdir cannot hold this run."""


class ConfigChangedError(WorkdirError, ValueError):
  """The workdir was made by a config that differs in a non-resumable field."""


class WorkdirLockedError(WorkdirError):
  """Another run holds the workdir's lock."""


class WorkdirNotWritableError(WorkdirError):
  """The workdir (or the folder it is to be made in) cannot be written."""


class NoRunError(WorkdirError, FileNotFoundError):
  """The workdir holds no run: its config.json is absent."""


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The files of a central or federated run's workdir (local or `gs://`).

  Attributes:
    root: the workdir (an `epath.Path`; a str or os.PathLike is converted).
  """
  root: epath.Path

  def __post_init__(self):
    object.__setattr__(self, "root", epath.Path(self.root))

  @property
  def config_path(self) -> epath.Path:
    """config.json: the config that made the run (`check_config`)."""
    return self.root / CONFIG_FILE

  @property
  def metrics_path(self) -> epath.Path:
    """metrics.jsonl: one JSON object per logged step or round."""
    return self.root / METRICS_FILE

  @property
  def samples_path(self) -> epath.Path:
    """eval_samples.txt: decoded evaluation samples, appended per eval."""
    return self.root / SAMPLES_FILE

  @property
  def final_eval_path(self) -> epath.Path:
    """final_eval.json: an evaluation of the final checkpoint (optional)."""
    return self.root / FINAL_EVAL_FILE

  @property
  def checkpoints_dir(self) -> epath.Path:
    """checkpoints/: one folder per saved step or round."""
    return self.root / CHECKPOINTS_DIR

  @property
  def analysis_dir(self) -> epath.Path:
    """analysis/: the layer-importance pass's outputs."""
    return self.root / ANALYSIS_DIR

  def config(self) -> ml_collections.ConfigDict:
    """The run's config, as config.json holds it.

    Raises:
      NoRunError: config.json is absent (also a FileNotFoundError).
      WorkdirError: config.json is not valid JSON.
    """
    path = self.config_path
    if not path.exists():
      raise NoRunError(
          f"No {os.fspath(path)}: {os.fspath(self.root)} holds no trained run;"
          " give the workdir of a central or federated run.")
    try:
      return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
      raise WorkdirError(
          f"{os.fspath(path)} is not valid JSON ({e}); it records the config"
          " that made this workdir: restore it or use a new workdir.") from e

  def metrics(self) -> list[dict[str, Any]]:
    """The records of metrics.jsonl in file order ([] if absent).

    Torn lines (a write cut short) are skipped; records of a stopped run
    (`metric_logging.STOPPED_KEY`) are kept.
    """
    return read_records(self.metrics_path)


def warn(message: str) -> None:
  """Logs a warning, and prints it to stderr too when the log goes to files."""
  logging.warning("%s", message)
  stream = getattr(logging.get_absl_handler().python_handler, "stream", None)
  if stream not in (sys.stderr, sys.__stderr__):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def is_remote(workdir: str | os.PathLike[str]) -> bool:
  """Whether `workdir` is a URI (`gs://...`) rather than a local path."""
  return "://" in os.fspath(workdir)


def check_is_directory(workdir: str | os.PathLike[str]) -> None:
  """Raises WorkdirError if `workdir`, or a folder above it, is a file."""
  path = epath.Path(workdir)
  # On GCS a "folder" is a name prefix: only the path itself can be a file.
  candidates = (path,) if is_remote(workdir) else (path, *path.parents)
  for candidate in candidates:
    if candidate.exists():
      if not candidate.is_dir():
        where = ("" if candidate == path else
                 f" ({os.fspath(candidate)} is a file)")
        raise WorkdirError(
            f"--workdir={os.fspath(workdir)} is not a directory{where}: give"
            " a directory (it is made if absent).")
      return


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b.c': leaf} of a nested dict (lists and tuples are leaves)."""
  if isinstance(tree, Mapping):
    flat = {}
    for key, value in tree.items():
      flat.update(flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: tree}


def config_as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as config.json holds it (references resolved, tuples lists)."""
  return json.loads(config.to_json_best_effort())


def changed_fields(saved: Mapping[str, Any], given: Mapping[str, Any],
                   resumable: Sequence[str] = RESUMABLE_FIELDS,
                   derived: Sequence[str] = DERIVED_FIELDS
                   ) -> list[tuple[str, Any, Any]]:
  """(field, saved value, given value) of every field a rerun may not change.

  Args:
    saved: the config that made the workdir (nested dicts, as JSON).
    given: the config of this run (the same form).
    resumable: patterns of the fields that may change.
    derived: patterns of the fields not compared (derived by the run).

  Returns:
    The fields that both configs have, with different values, sorted.
  """
  saved, given = flatten(saved), flatten(given)
  skip = tuple(resumable) + tuple(derived)
  return [(name, saved[name], given[name])
          for name in sorted(set(saved) & set(given))
          if not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)
          and saved[name] != given[name]]


def unmatched_fields(saved: Mapping[str, Any], given: Mapping[str, Any],
                     growable: Sequence[str] = ()
                     ) -> tuple[list[str], list[str]]:
  """(fields only `given` has, fields only `saved` has), sorted.

  A field only the given config has was added to the code after the workdir
  was made (the run that made it had no such choice); one only the saved
  config has was removed since. Fields matching a `growable` pattern are
  left out (a config may add or drop them).
  """
  saved, given = flatten(saved), flatten(given)
  keep = lambda name: not any(fnmatch.fnmatchcase(name, pattern)
                              for pattern in growable)
  return (sorted(n for n in set(given) - set(saved) if keep(n)),
          sorted(n for n in set(saved) - set(given) if keep(n)))


def check_config(workdir: str | os.PathLike[str],
                 config: ml_collections.ConfigDict, *,
                 config_file: str = CONFIG_FILE,
                 resumable: Sequence[str] = RESUMABLE_FIELDS,
                 derived: Sequence[str] = DERIVED_FIELDS,
                 growable: Sequence[str] = ()) -> bool:
  """Checks `config` against the one that made `workdir`; writes nothing.

  Args:
    workdir: the run's directory.
    config: this run's config.
    config_file: the file in `workdir` that holds the saved config.
    resumable: patterns of the fields a rerun may change.
    derived: patterns of the fields not compared.
    growable: patterns of the fields a rerun may add or drop silently.

  Returns:
    Whether the workdir already holds a config (False: a new run).

  Raises:
    ConfigChangedError: naming every other field that differs, with the saved
      and the given value.
  """
  path = epath.Path(workdir) / config_file
  if not path.exists():
    return False
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise WorkdirError(
        f"{os.fspath(path)} is not valid JSON ({e}); it records the config"
        " that made this workdir: restore it or use a new workdir.") from e
  given = config_as_json(config)
  changes = changed_fields(saved, given, resumable, derived)
  if changes:
    listed = "; ".join(f"{name}: {saved_value!r} in the workdir, {value!r} now"
                       for name, saved_value, value in changes)
    raise ConfigChangedError(
        f"--workdir={os.fspath(workdir)} was made by another config ({listed})."
        f" A rerun may change only {', '.join(resumable)}; use a new workdir"
        " (nothing was changed).")
  added, removed = unmatched_fields(saved, given, growable)
  if added or removed:
    now = flatten(given)
    parts = (["fields added since, as given now: "
              + ", ".join(f"{name}={now[name]!r}" for name in added)]
             if added else []) + (
                 [f"fields no longer used: {', '.join(removed)}"]
                 if removed else [])
    warn(f"{os.fspath(path)} was written by another version of the code"
         f" ({'; '.join(parts)}); resuming.")
  for name, saved_value, value in changed_fields(saved, given, (), derived):
    logging.info("Rerun changes %s: %r -> %r", name, saved_value, value)
  return True


def write_atomically(path: epath.Path, text: str) -> None:
  """Writes `text` to a temporary file next to `path`, then renames it."""
  tmp = path.parent / f"{path.name}.tmp"
  if is_remote(path):
    tmp.write_text(text)
  else:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  tmp.replace(path)


def _holder_text(holder: Mapping[str, Any]) -> str:
  return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')},"
          f" started {holder.get('started', '?')}")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Alive, owned by another user.
  return True


class WorkdirLock:
  """`<workdir>/.lock`, held by this process from `acquire` to `release`.

  Usable as a context manager. See the module docstring for the rules.
  """

  def __init__(self, workdir: str | os.PathLike[str]):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    # The holder record is written through filelock's descriptor once the
    # flock is held (`on_acquired`); a raise there gives the lock back.
    self._lock = filelock.FileLock(
        self.path, mode=0o644, thread_local=False, blocking=False,
        on_acquired=functools.partial(self._take, flocked=True))
    # The open lock file where the file system has no flock (see `acquire`).
    self._fd_without_flock: int | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirLockedError naming its holder."""
    if is_remote(self.workdir):
      logging.warning("%s is not locked: workdirs on GCS have no lock (run"
                      " one job per workdir).", self.workdir)
      return
    try:
      os.makedirs(self.workdir, exist_ok=True)
      for _ in range(5):
        try:
          self._lock.acquire()
          return
        except filelock.Timeout as e:
          # filelock also gives up when the holder removed the file (released
          # the lock) between its open and its flock: then try again.
          if os.path.exists(self.path):
            raise WorkdirLockedError(
                f"--workdir={self.workdir} is in use by another run"
                f" ({_holder_text(self._read_path())}); wait for it to end or"
                " use another workdir.") from e
    except OSError as e:
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        self._acquire_without_flock()
        return
      self._raise_if_not_writable(e)
      raise
    raise WorkdirLockedError(f"Could not take the lock {self.path}.")

  def _raise_if_not_writable(self, e: OSError) -> None:
    """Raises WorkdirNotWritableError if `e` is a permission error."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
      raise WorkdirNotWritableError(
          f"--workdir={self.workdir} cannot be written ({e.strerror}:"
          f" {e.filename or self.path}): make it writable (chmod u+w; chattr"
          " -i if it is immutable; remount a read-only file system) or use"
          " another workdir.") from e

  def _acquire_without_flock(self) -> None:
    """The lock on a file system without flock: the holder record alone.

    filelock's own answer there (its soft lock) takes no `on_acquired`, writes
    a record of its own format in the file, and covers ENOSYS only, not the
    ENOLCK of an NFS mount without a lock daemon; so the record is checked
    here: a live process on this host still holds the lock.
    """
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      self._raise_if_not_writable(e)
      raise
    try:
      self._take(fd, flocked=False)
    except BaseException:
      os.close(fd)
      raise
    self._fd_without_flock = fd

  def _read_path(self) -> dict[str, Any]:
    """The holder record in the lock file ({} where there is none)."""
    try:
      fd = os.open(self.path, os.O_RDONLY)
    except FileNotFoundError:
      return {}
    try:
      return self._read(fd)
    finally:
      os.close(fd)

  @staticmethod
  def _read(fd: int) -> dict[str, Any]:
    text = os.pread(fd, 65536, 0).decode(errors="replace")
    if not text.strip():
      return {}
    try:
      holder = json.loads(text)
    except json.JSONDecodeError:
      return {"pid": "?", "host": "?", "started": f"unreadable: {text[:40]!r}"}
    return holder if isinstance(holder, dict) else {}

  def _take(self, fd: int, flocked: bool) -> None:
    """Writes this process into the lock file, after checking who was there."""
    previous = self._read(fd)
    host = socket.gethostname()
    if previous:
      same_host = previous.get("host") == host
      pid = previous.get("pid")
      if not same_host and os.environ.get(TAKE_OVER_ENV) != "1":
        raise WorkdirLockedError(
            f"--workdir={self.workdir} is locked by a run on another host"
            f" ({_holder_text(previous)}), which cannot be checked from here;"
            f" if it has ended, rerun with {TAKE_OVER_ENV}=1.")
      if (same_host and not flocked and isinstance(pid, int)
          and pid != os.getpid() and _pid_alive(pid)):
        raise WorkdirLockedError(
            f"--workdir={self.workdir} is in use by another run"
            f" ({_holder_text(previous)}); wait for it to end or use another"
            " workdir.")
      warn(f"Taking over the lock {self.path} left by a run that is gone"
           f" ({_holder_text(previous)}).")
    holder = json.dumps({
        "pid": os.getpid(), "host": host,
        "started": datetime.datetime.now().isoformat(timespec="seconds")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    os.fsync(fd)

  def release(self) -> None:
    """Removes the lock file and drops the lock (a no-op if not held)."""
    if not self._lock.is_locked and self._fd_without_flock is None:
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
    if self._fd_without_flock is not None:
      os.close(self._fd_without_flock)
      self._fd_without_flock = None
    else:
      self._lock.release()

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def parse_records(text: str) -> tuple[list[dict[str, Any]], list[str]]:
  """The JSON objects of a metrics.jsonl text, and the lines that are not one.

  A torn last line (a write cut short) and any other line that is not a JSON
  object are returned in the second list instead of raising.
  """
  records, bad = [], []
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      bad.append(line)
      continue
    if isinstance(record, dict):
      records.append(record)
    else:
      bad.append(line)
  return records, bad


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file ([] if absent), torn lines skipped."""
  path = epath.Path(path)
  if not path.exists():
    return []
  return parse_records(path.read_text())[0]
