r"""Entry point: `python -m conformer_fl.main --config=configs/NAME.py[:ARG] --workdir=DIR`.

Fields are overridden with `--config.FIELD=VALUE` (e.g. `--config.federated.rounds=5`).
Running again on the same workdir resumes from its latest checkpoint. With absl's
`--log_dir=DIR` the log is written to files in DIR instead of the terminal.

A run that is refused or stops for a reason it can name (`conformer_fl.workdir.RunError`:
a workdir that is a file, holds another config or is in use; divergence; no intact
checkpoint) prints one line `error: ...` on stderr and exits with status 1.

Multi-host: on a Cloud TPU pod, `jax.distributed.initialize()` finds the other hosts
by itself; `launch/local_multiprocess.py` stands in for a pod on one machine by setting
CONFORMER_FL_COORDINATOR, CONFORMER_FL_NUM_PROCESSES and CONFORMER_FL_PROCESS_ID.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/NAME.py[:ARG]).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run.")
flags.mark_flags_as_required(["config", "workdir"])


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
  from conformer_fl import train  # pylint: disable=g-import-not-at-top

  logging.info(
      "JAX process %d of %d; %d local devices, %d in all: %s",
      jax.process_index(), jax.process_count(), jax.local_device_count(),
      jax.device_count(), jax.devices(),
  )
  from conformer_fl import workdir  # pylint: disable=g-import-not-at-top

  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except workdir.RunError as e:
    # Refused or stopped for a reason the message names (another config, a
    # locked workdir, divergence, no intact checkpoint): one line, status 1.
    if flags.FLAGS.log_dir:
      logging.error("%s", e)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
