r"""The study end to end: pre-train, analyse, adapt with targeted Federated Dropout.

`make demo` runs this config (scale=demo) on the local synthesized corpus:

  python -m conformer_fl.main --config=configs/experiment.py --workdir=runs/demo
  python -m conformer_fl.main --config=configs/experiment.py:seeds=0+1+2,norm=batch_norm \
      --workdir=runs/demo_bn3

Stages (conformer_fl/experiment/__init__.py): (1) build the corpus; (2) central
pre-training on the long-form domain, checkpoints from step 0 (`pretrain`, a
configs/central.py config); (3) the layer-importance analysis of the pre-trained
model (`analysis`, a configs/analysis.py config); (4) federated adaptation to the
withheld short-form domain, one client per speaker, once per arm and seed
(`adapt`, a configs/federated.py config, with `federated.dropout` set per arm);
(5) scale=study only: the stability runs (below); (6) the client cost of each
arm and W/report.md. Any field can be overridden, e.g.
`--config.adapt.federated.rounds=40` or `--config.targeting.rule=ambient`.

The arms (conformer_fl/experiment/arms.py):
  full      the whole model on every client;
  targeted  the targeted (least important) units lose `targeting.targeted_rate`
            of their feed-forward units, conv channels and attention heads;
  uniform   the control: the same rate on every droppable layer, set so a client
            optimizes as many parameters as in `targeted`;
  freeze    clients do not train the targeted units at all.
`targeting.rule`: 'rank' targets the `targeting.num_units` units whose reset to
their initial value raises `targeting.metric` least; 'ambient' targets the units
the analysis calls ambient (its WER thresholds: config.analysis). The demo
ranks the droppable modules (ffn1, mhsa, conv, ffn2 of every block; the
analysis runs at module granularity) by the WER increase; the tiny scale,
whose 6-step model transcribes nothing, ranks them by the loss increase.

The demo (`make demo`, 18 minutes on 2 CPU cores; the README gives the
measured time of each stage): the `demo` corpus (long form: 2-6 s sentences of
a closed-vocabulary grammar; short form: <= 2 s commands), the demo-size
Conformer (4 blocks x 96, CTC over characters) pre-trained centrally on one
device with lighter SpecAugment and tight buckets, the analysis on 160 dev
utterances, four arms x 3 federated seeds (20 rounds of 4 clients x 8 local
steps), and the final evaluation of every arm and seed on all 240 test
utterances of 8 held-out speakers, with paired bootstrap intervals
(W/report.md).

The study (claims 2 and 3; the README gives its measured time and table):

  python -m conformer_fl.main --config=configs/experiment.py:scale=study \
      --workdir=runs/demo

is the demo (every field the same, so it reuses a finished `make demo` in the
same workdir) plus `stability.runs`: the demo model pre-trained over seeds
0, 1, 2 x {group norm, batch norm} and the 6-block `demo_deep` (group norm,
seed 0), each in W/stability/NAME with the demo's pre-training and analysis
config (the analysis resets to the initial value only,
`stability.analysis_taus`: what the comparison reads). Every pair of runs
that differs in one thing (the seed, the norm or the size) is compared:
Jaccard overlap of the ambient sets beside its chance level, Spearman
correlation of the units' WER increase, units of different depths matched
by relative depth (conformer_fl/experiment/stability_runs.py). The run
`pretrain` is (demo, group norm, seed 0). `stability.runs` is a dict of
central run configs, one per run, named SIZE_NORM_seedS.

Argument (all optional, `key=value,...`):
  scale    demo (the `make demo` default: about 18 minutes on 2 CPU cores)
           | study (the demo plus the stability runs: 70 minutes on 2 CPU
             cores from scratch, 47 of them for the stability runs)
           | tiny (a minute: the test of the whole pipeline)        (demo)
  norm     conv-module norm: group_norm | batch_norm | layer_norm   (group_norm)
  decoder  ctc | rnnt                                                (ctc)
  seeds    federated seeds (client sampling, dropout draws), '+'-separated;
           every arm runs once per seed       (the scale's: demo 0+1+2, tiny 0)
  rounds   federated rounds per arm (0 = the scale's default)         (0)
  steps    central pre-training steps (0 = the scale's default)       (0)
  stability_seeds  pre-training seeds of the stability runs, '+'-separated
                   (the scale's: study 0+1+2, otherwise none: no stage 5)
  stability_norms  their conv norms, '+'-separated (study: group_norm+batch_norm;
                   empty: `norm`)
  stability_sizes  extra sizes, each pre-trained once at (norm, seed 0)
                   (study: demo_deep)
"""

from typing import Any

import ml_collections

from conformer_fl import config_lib

# Per scale: corpus and model size; pre-training steps, peak learning rate,
# warm-up, buckets and tokenizer; analysis granularity, dev batches and
# re-randomization draws; federated rounds, clients per round, local steps,
# client batch and client learning rate; eval batches of the runs; targeting
# (units, metric); the default federated seeds.
_SCALES = {
    "demo": dict(corpus="demo", size="demo", steps=1200, peak_lr=2e-3,
                 warmup=200, buckets=(3.0, 4.5, 6.0), tokenizer="char",
                 granularity="module", analysis_batches=20,
                 rerandomize_seeds=0, rounds=20,
                 clients=4, local_steps=8, batch=4, client_lr=0.2,
                 eval_batches=12,
                 num_units=4, metric="wer", seeds="0+1+2", pretrain_devices=1,
                 stability_seeds="", stability_norms="", stability_sizes=""),
    "tiny": dict(corpus="tiny", size="tiny", steps=6, peak_lr=2e-3, warmup=2,
                 buckets=(10.0,), tokenizer="sentencepiece",
                 granularity="module",
                 analysis_batches=1, rerandomize_seeds=1, rounds=2, clients=4,
                 local_steps=2, batch=2, client_lr=0.05, eval_batches=1,
                 num_units=1, metric="loss",
                 seeds="0", pretrain_devices=0,
                 stability_seeds="", stability_norms="", stability_sizes=""),
}
# The study: the demo, then pre-training over 3 seeds x {group norm, batch
# norm} and one larger size, each analysed (claims 2 and 3).
_SCALES["study"] = dict(_SCALES["demo"], stability_seeds="0+1+2",
                        stability_norms="group_norm+batch_norm",
                        stability_sizes="demo_deep")


def _pretrain_config(s: dict[str, Any], size: str, norm: str, decoder: str,
                     seed: int, steps: int) -> ml_collections.ConfigDict:
  """Central pre-training of one model on the long-form domain."""
  pretrain = config_lib.central_run_config(
      size=size, norm=norm, decoder=decoder, corpus=s["corpus"],
      domain="long", steps=steps, seed=seed)
  pretrain.eval_max_batches = s["eval_batches"]
  pretrain.central.peak_learning_rate = s["peak_lr"]
  pretrain.central.warmup_steps = s["warmup"]
  pretrain.central.log_every = max(1, min(50, steps // 10))
  pretrain.central.eval_every = max(1, steps // 4)
  # The analysis resets units to these checkpoints (tau), 0 included.
  pretrain.central.checkpoint_every = max(1, steps // 2)
  # Buckets that fit the long-form utterances tightly: less padding.
  pretrain.data.bucket_seconds = s["buckets"]
  # Characters: a demo-size model learned them several times faster than a
  # 128-piece sentencepiece vocabulary (dev CER 0.44 against 0.86 after 200
  # steps), and it can spell the adaptation domain's new words.
  pretrain.data.tokenizer.kind = s["tokenizer"]
  # SpecAugment lighter than the LibriSpeech policy of the model's default
  # (10 time masks, 2 frequency masks of 27 bins): a model trained for
  # minutes on a few hours of speech learned faster with less masking.
  pretrain.model.specaug_num_time_masks = 2
  pretrain.model.specaug_num_freq_masks = 1
  pretrain.model.specaug_max_freq_mask = 15
  # The demo pre-trains on one device: on this 2-core machine a step split
  # over 4 XLA CPU devices took twice as long (1.3 s against 0.65 s, measured
  # side by side). The federated rounds keep every device (4 clients on 4
  # devices: 2.5 clients/s against 1.9 on one).
  pretrain.central.num_devices = s["pretrain_devices"]
  return pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, scale="demo", norm="group_norm", decoder="ctc",
                           seeds="", rounds=0, steps=0, stability_seeds="",
                           stability_norms="", stability_sizes="")
  if a.scale not in _SCALES:
    raise ValueError(f"scale={a.scale!r}; expected one of {sorted(_SCALES)}.")
  s = _SCALES[a.scale]
  steps = a.steps or s["steps"]
  rounds = a.rounds or s["rounds"]

  config = ml_collections.ConfigDict()
  config.mode = "experiment"
  # Federated seeds: every arm runs once per seed.
  config.seeds = tuple(int(x) for x in (a.seeds or s["seeds"]).split("+"))
  # The split of the final evaluation of every arm (held-out speakers).
  config.final_eval_split = "test"

  # (2) Central pre-training on the long-form domain.
  config.pretrain = _pretrain_config(s, s["size"], a.norm, a.decoder, seed=0,
                                     steps=steps)
  pretrain = config.pretrain

  # (3) Layer importance of the pre-trained model, on its own dev split:
  # units at module granularity (ffn1, mhsa, conv, ffn2 of every block), so
  # that the movement / importance correlation has 4 units per block.
  analysis = config_lib.analysis_run_config(granularity=s["granularity"],
                                            seeds=s["rerandomize_seeds"])
  analysis.analysis.eval_max_batches = s["analysis_batches"]
  # Reset to the initial value and to the middle checkpoint (resetting to
  # the trained checkpoint itself would only repeat the baseline).
  analysis.analysis.taus = f"0,{pretrain.central.checkpoint_every}"
  # One variant at a time: faster than vmapped variants on 2 CPU cores for
  # the demo size (benchmarks/analysis_vectorized.py).
  analysis.analysis.vectorized = a.scale == "tiny"
  config.analysis = analysis

  # (4) Federated adaptation to the short-form domain.
  adapt = config_lib.federated_run_config(
      size=s["size"], norm=a.norm, decoder=a.decoder, corpus=s["corpus"],
      domain="short", rounds=rounds, seed=0)
  adapt.model = pretrain.model.copy_and_resolve_references()
  adapt.data.tokenizer = pretrain.data.tokenizer.copy_and_resolve_references()
  adapt.eval_max_batches = s["eval_batches"]
  f = adapt.federated
  f.clients_per_round = s["clients"]
  f.local_steps = s["local_steps"]
  f.client_batch_size = s["batch"]
  # Demo: 4 clients x 8 local steps at SGD 0.2 adapt faster than 8 x 4 at
  # 0.05 for the same client steps per round (full arm, dev WER at round 20:
  # 0.26 against 0.49; README, "What `make demo` measured").
  f.client_optimizer.learning_rate = s["client_lr"]
  # One compiled round per arm: every round padded to the one bucket, which
  # holds the short-form utterances (<= 2 s).
  adapt.data.bucket_seconds = (2.0,)
  f.fixed_round_shape = True
  f.eval_every = max(1, rounds // 2)
  f.checkpoint_every = max(1, rounds // 2)
  f.unit_granularity = s["granularity"]
  config.adapt = adapt

  # The arms, and which units the targeted and freeze arms aim at.
  config.arms = ("full", "uniform", "targeted", "freeze")
  config.targeting = ml_collections.ConfigDict(dict(
      rule="rank",                  # 'rank' | 'ambient'
      num_units=s["num_units"],     # rule 'rank': how many units
      metric=s["metric"],           # rule 'rank': rank by 'wer' or 'loss'
      targeted_rate=0.5,            # dropout rate of the targeted units
      other_rate=0.0,               # dropout rate of every other unit
  ))

  # (6) Claims 2 and 3 (scale=study): more pre-training runs, each analysed,
  # compared with each other and with `pretrain`.
  config.stability = ml_collections.ConfigDict()
  config.stability.runs = ml_collections.ConfigDict({
      name: _pretrain_config(s, size, norm, a.decoder, seed, steps)
      for name, (size, norm, seed) in _stability_points(a, s).items()})
  # The comparison reads the reset to the initial value (tau = 0) only.
  config.stability.analysis_taus = "0"

  # Every stage reads the same corpus.
  config.data_dir = config_lib.DEFAULT_DATA_DIR
  for stage in (config.pretrain, config.adapt, *config.stability.runs.values()):
    stage.data.data_dir = config.get_ref("data_dir")
  return config


def _split(value: str) -> tuple[str, ...]:
  return tuple(v for v in value.split("+") if v)


def _stability_points(a: ml_collections.ConfigDict, s: dict[str, Any]
                      ) -> dict[str, tuple[str, str, int]]:
  """{run name: (size, norm, seed)} of the stability runs, `pretrain` left out.

  The grid seeds x norms at the scale's size, then each extra size at
  (norm, seed 0).
  """
  seeds = [int(x) for x in _split(a.stability_seeds or s["stability_seeds"])]
  norms = _split(a.stability_norms or s["stability_norms"]) or (a.norm,)
  sizes = _split(a.stability_sizes or s["stability_sizes"])
  points = [(s["size"], norm, seed) for norm in norms for seed in seeds]
  points += [(size, a.norm, 0) for size in sizes]
  main = (s["size"], a.norm, 0)
  return {f"{size}_{norm}_seed{seed}": (size, norm, seed)
          for size, norm, seed in points if (size, norm, seed) != main}
