r"""Federated training of a Conformer, one client per speaker.

Each round samples `clients_per_round` speakers; every client trains K local steps
of its own optimizer (fresh each round) on its padded, masked batches, all clients
under vmap and sharded over the `clients` axis of a mesh spanning every device;
the server averages the deltas by example counts and applies its optimizer, in one
jit-compiled function. By default the clients adapt a centrally pre-trained model
(`init_workdir`) to the short-form domain, the paper's federated experiment.

  python -m conformer_fl.main --config=configs/federated.py \
      --config.federated.init_workdir=/tmp/cfl/central --workdir=/tmp/cfl/federated
  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \
      --config=configs/federated.py:size=tiny,corpus=tiny --workdir=/tmp/cfl/fed_mh
  python -m conformer_fl.main \
      --config=configs/federated.py:size=S,corpus=librispeech,domain=all \
      --config.federated.init_workdir=gs://BUCKET/central --workdir=gs://BUCKET/fed

Argument (all optional, `key=value,...`):
  size     model size: tiny | demo | S | M | L             (default demo)
  norm     conv-module norm: batch_norm | group_norm | layer_norm (group_norm)
  decoder  ctc | rnnt                                       (ctc)
  corpus   synthetic_speech builder config, or librispeech   (demo)
           (prepared as array_record: clients are read from disk per round)
  domain   the clients' domain: short | long | all           (short)
           (librispeech: all = every utterance, the paper's setting; short /
           long split it at data.short_max_seconds)
  server   fedavg | fedavgm | fedadam | fedyogi              (fedavg)
  rounds   number of rounds                                  (60)
  seed                                                       (0)

The server optimizer also switches by one flag,
`--config.federated.server_optimizer.name=fedadam`: its unset fields take the
name's defaults (conformer_fl/optimizers.py, SERVER_DEFAULTS); a field set by
another flag, e.g. `--config.federated.server_optimizer.learning_rate=0.03`, wins.

Off switches: every optional clip and rate is off at 0, e.g.
`--config.federated.client_optimizer.clip_grad_norm=0` (clients' gradient
clipping), `--config.federated.clip_update_norm=0`, `--config.model.dropout_rate=0`
(config_lib lists them all). With decoder=ctc, utterances that CTC cannot align
(more labels, plus one per repeated label, than the 25 encoder frames per second
of audio) are skipped and counted as 'ctc_unalignable'
(`--config.data.skip_ctc_unalignable=False` keeps them).
"""

import ml_collections

from conformer_fl import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, size="demo", norm="group_norm", decoder="ctc",
                           corpus="demo", domain="short", server="fedavg",
                           rounds=60, seed=0)
  # Fields: config_lib.federated_run_config and config_lib.federated_config.
  return config_lib.federated_run_config(**a)
