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
  corpus   a synthetic_speech builder config (tiny | demo | small | medium),
           or librispeech                                   (demo)
  domain   training domain: long | short | all              (long)
  steps    training steps                                   (1200)
  seed     seed of init, data order, dropout and SpecAugment (0)
"""

import ml_collections

from conformer_fl import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, size="demo", norm="group_norm", decoder="ctc",
                           corpus="demo", domain="long", steps=1200, seed=0)
  config = ml_collections.ConfigDict()
  config.mode = "central"
  config.seed = a.seed
  config.data = config_lib.data_config_for_corpus(a.corpus)
  config.data.train_domains = () if a.domain == "all" else (a.domain,)
  config.data.eval_domains = config.data.train_domains
  config.model = config_lib.model_config(a.size, conv_norm=a.norm,
                                         decoder=a.decoder)
  # Evaluate on at most this many eval batches (0 = the whole eval split).
  config.eval_max_batches = 0

  # Optimizer and cadence of central training.
  config.central = ml_collections.ConfigDict()
  config.central.num_steps = a.steps
  config.central.peak_learning_rate = 2e-3
  config.central.warmup_steps = 200
  config.central.b1 = 0.9
  config.central.b2 = 0.98
  config.central.eps = 1e-9
  config.central.clip_grad_norm = 5.0  # 0 = no clipping
  config.central.log_every = 20
  config.central.eval_every = 200
  config.central.checkpoint_every = 100
  # Units (`conformer_fl.models.list_units` names, module granularity) whose
  # weights stay at their initial value, e.g. ("encoder/block_01/conv",).
  config.central.frozen_units = ()
  return config
