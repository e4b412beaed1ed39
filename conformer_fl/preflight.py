"""Checks of a run against its workdir and devices, before anything is written.

`check(config, workdir)` runs first in `conformer_fl.main.run`, so that the
mistakes a user makes every day are refused with one line naming the problem
and the fix (`PreflightError`, a `workdir.RunError`: the entry point prints it
and exits with status 1), before the workdir is created or written:

  central, federated  the workdir is not an experiment's (it has
                      experiment_config.json);
  federated           federated.clients_per_round divides over the devices;
                      federated.init_workdir has a checkpoint (init_step, if
                      set) when the run starts afresh;
  experiment          the workdir is not a central or federated run's (it has
                      config.json but no experiment_config.json);
                      adapt.federated.clients_per_round divides over the
                      devices;
  analysis            the workdir holds a trained run (config.json and a
                      checkpoint).

Then the corpus of a central or federated run is built or refused
(`conformer_fl.data.corpus.ensure_prepared`; the experiment builds its own the
same way), its errors turned into one-line `PreflightError`s.
"""

import os

from etils import epath
import jax
import ml_collections

from conformer_fl import checkpointing
from conformer_fl import cli
from conformer_fl import workdir as workdir_lib
from conformer_fl.data import corpus
from conformer_fl.data import librispeech
from conformer_fl.data import record_source
from conformer_fl.data import tts_engines

EXPERIMENT_CONFIG_FILE = "experiment_config.json"


class PreflightError(workdir_lib.RunError):
  """A run refused before it starts (one line: the problem and the fix)."""


def check_not_experiment(workdir: str) -> None:
  """Refuses a central or federated run in an experiment's workdir."""
  path = epath.Path(workdir)
  if (path / EXPERIMENT_CONFIG_FILE).exists():
    raise PreflightError(
        f"{workdir} is an experiment's workdir (it has"
        f" {EXPERIMENT_CONFIG_FILE}): run configs/experiment.py there, or give"
        " this run a new --workdir (the experiment's pre-trained run is"
        f" {path / 'pretrain'}).")


def check_not_single_run(workdir: str) -> None:
  """Refuses an experiment in a central or federated run's workdir."""
  path = epath.Path(workdir)
  if ((path / workdir_lib.CONFIG_FILE).exists()
      and not (path / EXPERIMENT_CONFIG_FILE).exists()):
    raise PreflightError(
        f"{workdir} holds a central or federated run ({workdir_lib.CONFIG_FILE},"
        f" no {EXPERIMENT_CONFIG_FILE}): give the experiment a new --workdir.")


def check_clients_divide(clients_per_round: int, field: str,
                         num_devices: int | None = None) -> None:
  """Refuses a clients_per_round that does not divide over the devices."""
  num_devices = num_devices or jax.device_count()
  if clients_per_round <= 0 or clients_per_round % num_devices:
    multiple = max(1, -(-max(clients_per_round, 1) // num_devices)) * num_devices
    raise PreflightError(
        f"{field}={clients_per_round} does not divide over the {num_devices}"
        " devices (each device trains the same number of clients): set"
        f" --config.{field}={multiple} (a multiple of {num_devices}).")


def check_init_workdir(federated: ml_collections.ConfigDict,
                       workdir: str) -> None:
  """Refuses a federated.init_workdir without the checkpoint a new run needs."""
  if not federated.init_workdir:
    return
  if checkpointing.latest_saved_step(workdir) is not None:
    return  # Resumes from its own checkpoint; the initial one is not read.
  init_workdir = federated.init_workdir
  if not epath.Path(init_workdir).exists():
    raise PreflightError(
        f"federated.init_workdir={init_workdir!r} does not exist: give a"
        " finished central run's workdir, or '' to start from random"
        " weights.")
  latest = checkpointing.latest_saved_step(init_workdir)
  if latest is None:
    raise PreflightError(
        f"federated.init_workdir={init_workdir!r} has no checkpoint: run the"
        f" central training there first (configs/central.py"
        f" --workdir={init_workdir}), or give another workdir.")
  if federated.init_step >= 0:
    steps = checkpointing.CheckpointStore(init_workdir, read_only=True).all_steps()
    if federated.init_step not in steps:
      raise PreflightError(
          f"federated.init_step={federated.init_step} is not a checkpoint of"
          f" {init_workdir} (saved steps: {steps}): set"
          " --config.federated.init_step to one of them, or -1 for the"
          " latest.")


def check_trained_run(workdir: str) -> None:
  """Refuses the analysis of a workdir that holds no trained run."""
  path = epath.Path(workdir)
  if (path / EXPERIMENT_CONFIG_FILE).exists():
    raise PreflightError(
        f"{workdir} is an experiment's workdir, whose analysis is its own"
        " stage: give the analysis its pre-trained run,"
        f" --workdir={path / 'pretrain'}.")
  if not (path / workdir_lib.CONFIG_FILE).exists():
    raise PreflightError(
        f"{workdir} holds no trained run (no {workdir_lib.CONFIG_FILE}): give"
        " the analysis the --workdir of a finished central or federated run.")
  if checkpointing.latest_saved_step(workdir) is None:
    raise PreflightError(
        f"{workdir} has no checkpoint: train there first (its run's"
        " config.json names the config), then run the analysis.")


def prepare_corpus(data_config: ml_collections.ConfigDict,
                   random_access: bool) -> None:
  """`corpus.ensure_prepared`, its errors as one-line PreflightErrors."""
  try:
    corpus.ensure_prepared(data_config, random_access)
  except (tts_engines.MissingSystemPackagesError,
          librispeech.LibriSpeechNotPrepared,
          record_source.NotRandomAccess) as e:
    raise PreflightError(cli.one_line(str(e))) from e


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The checks of `config.mode` (module docstring); builds the corpus.

  Raises:
    PreflightError: the run cannot start; its message names the fix.
  """
  workdir = os.fspath(workdir)
  mode = config.get("mode")
  if mode in ("central", "federated"):
    check_not_experiment(workdir)
  if mode == "federated":
    check_clients_divide(config.federated.clients_per_round,
                         "federated.clients_per_round")
    check_init_workdir(config.federated, workdir)
  if mode == "experiment":
    check_not_single_run(workdir)
    check_clients_divide(config.adapt.federated.clients_per_round,
                         "adapt.federated.clients_per_round")
  if mode == "analysis":
    check_trained_run(workdir)
  if mode in ("central", "federated"):
    prepare_corpus(config.data, random_access=mode == "federated")
