r"""Central pre-training of a Conformer: the paper's first stage.

The model is trained on one domain of the corpus (long-form speech by default, the
short-form utterances withheld for federated adaptation), with Adam (0.9, 0.98, 1e-9),
linear warm-up and inverse-square-root decay, SpecAugment and checkpoints from step 0
(the analysis pass resets layers to them).

  python -m conformer_fl.main --config=configs/central.py --workdir=/tmp/cfl/central
  python -m conformer_fl.main --config=configs/central.py:size=S,corpus=librispeech \
      --workdir=gs://BUCKET/central_S

Argument (all optional, `key=value,...`):
  size     model size: tiny | demo | S | M | L            (default demo)
  norm     conv-module norm: batch_norm | group_norm | layer_norm (group_norm)
  decoder  ctc | rnnt                                      (ctc)
  corpus   a synthetic_speech builder config (tiny | demo | study | small |
           medium), or librispeech                          (demo)
  domain   training domain: long | short | all              (long)
  steps    training steps                                   (1200)
  seed     seed of init, data order, dropout and SpecAugment (0)

Off switches: every optional clip and rate is off at 0, e.g.
`--config.central.clip_grad_norm=0`, `--config.model.dropout_rate=0`,
`--config.model.specaug_num_time_masks=0`, `--config.data.max_label_rate=0`
(config_lib lists them all). With decoder=ctc, utterances that CTC cannot align
(more labels, plus one per repeated label, than the 25 encoder frames per second
of audio) are skipped and counted as 'ctc_unalignable'
(`--config.data.skip_ctc_unalignable=False` keeps them).
"""

import ml_collections

from conformer_fl import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, size="demo", norm="group_norm", decoder="ctc",
                           corpus="demo", domain="long", steps=1200, seed=0)
  # Fields: config_lib.central_run_config.
  return config_lib.central_run_config(**a)
