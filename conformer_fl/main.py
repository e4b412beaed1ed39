r"""Entry point: `python -m conformer_fl.main --config=configs/NAME.py[:ARG] --workdir=DIR`.

Fields are overridden with `--config.FIELD=VALUE` (e.g. `--config.federated.rounds=5`).
Running again on the same workdir resumes from its latest checkpoint. With absl's
`--log_dir=DIR` the log is written to files in DIR instead of the terminal.

A run that is refused or stops for a reason it can name (`conformer_fl.workdir.RunError`:
a workdir that is a file, holds another config or is in use; the checks of
`conformer_fl/preflight.py`; divergence; no intact checkpoint), and a flag that does
not parse (`conformer_fl/cli.py`: a mistyped `--config.FIELD`, a missing config file),
print one line `error: ...` on stderr and exit with status 1.

Multi-host: on a Cloud TPU pod, `jax.distributed.initialize()` finds the other hosts
by itself; `launch/local_multiprocess.py` stands in for a pod on one machine by setting
CONFORMER_FL_COORDINATOR, CONFORMER_FL_NUM_PROCESSES and CONFORMER_FL_PROCESS_ID.

`run(config, workdir)` runs `config.mode` (one of MODES); notebooks and tests
call it directly:
  central     `train.train_central` (conformer_fl/train.py)
  federated   `train.train_federated`
  analysis    the layer-importance pass over a finished run
              (`conformer_fl.analysis.run_analysis`)
  experiment  pre-training, analysis and federated arms in sub-directories
              (`conformer_fl.experiment.run_experiment`), whose training stages
              run the central and federated training of train.py.
"""

import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from conformer_fl import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/NAME.py[:ARG]).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run.")
flags.mark_flags_as_required(["config", "workdir"])

MODES = ("central", "federated", "analysis", "experiment")


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs `config.mode` in `workdir` (module docstring).

  Returns:
    central / federated: the final params (host numpy); analysis: its
    results (`analysis.Importance`); experiment: its summary.

  `preflight.check` runs first: the mistakes it finds (an experiment's
  workdir for a single run, clients that do not divide over the devices, an
  init_workdir without a checkpoint, an analysis without a trained run, a
  corpus that cannot be built or read) are refused before anything is
  written; it builds the local corpus (ArrayRecord) when it is missing.

  Raises:
    workdir.RunError: a run refused or stopped for a reason its one-line
      message names (see `preflight` and `train.train_central`).
    ValueError: an unknown mode.
  """
  # pylint: disable=g-import-not-at-top
  # Imported here, each mode only what it runs: jax must not start before
  # `_initialize_distributed`.
  from conformer_fl import preflight
  from conformer_fl import train
  preflight.check(config, workdir)
  if config.mode == "central":
    return train.train_central(config, workdir)
  if config.mode == "federated":
    return train.train_federated(config, workdir)
  if config.mode == "analysis":
    from conformer_fl import analysis
    return analysis.run_analysis(config, workdir)
  if config.mode == "experiment":
    from conformer_fl import experiment
    return experiment.run_experiment(
        config, workdir, train_central=train.train_central,
        train_federated=train.train_federated)
  # pylint: enable=g-import-not-at-top
  raise ValueError(f"config.mode must be one of {MODES}, got {config.mode!r}")


def _initialize_distributed() -> None:
  """Joins the other processes of a multi-host job, if this is one."""
  import jax  # pylint: disable=g-import-not-at-top

  coordinator = os.environ.get("CONFORMER_FL_COORDINATOR")
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(os.environ["CONFORMER_FL_NUM_PROCESSES"]),
        process_id=int(os.environ["CONFORMER_FL_PROCESS_ID"]),
    )
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get(
      "CLOUD_TPU_TASK_ID"
  ):
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if flags.FLAGS.log_dir:
    # absl's --log_dir: the log goes to files there (`make demo` uses it).
    logging.get_absl_handler().use_absl_log_file()
  _initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # TensorFlow only reads data here: keep it off accelerators.
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")

  logging.info(
      "JAX process %d of %d; %d local devices, %d in all: %s",
      jax.process_index(), jax.process_count(), jax.local_device_count(),
      jax.device_count(), jax.devices(),
  )
  from conformer_fl import workdir  # pylint: disable=g-import-not-at-top

  from conformer_fl.data import librispeech  # pylint: disable=g-import-not-at-top
  from conformer_fl.data import record_source  # pylint: disable=g-import-not-at-top
  from conformer_fl.data import tts_engines  # pylint: disable=g-import-not-at-top

  try:
    run(_CONFIG.value, _WORKDIR.value)
  except (workdir.RunError, tts_engines.MissingSystemPackagesError,
          librispeech.LibriSpeechNotPrepared,
          record_source.NotRandomAccess) as e:
    # Refused or stopped for a reason the message names (another config, a
    # locked workdir, divergence, no intact checkpoint, a corpus that cannot
    # be built or read): one line, status 1.
    if flags.FLAGS.log_dir:
      logging.error("%s", e)
    cli.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
