r"""Claim 5 put to a test: pre-train, analyse, adapt with cost-matched arms.

`make demo` runs this config (scale=demo) on the local synthesized corpus:

  python -m conformer_fl.main --config=configs/experiment.py --workdir=runs/demo
  python -m conformer_fl.main --config=configs/experiment.py:scale=study \
      --workdir=runs/study

Stages (conformer_fl/experiment/__init__.py): (1) build the corpus; (2)
central pre-training of each model of `pretrain_seeds` on the long-form
domain, checkpoints from step 0 (`pretrain`: W/pretrain for the first seed,
W/pretrain_model1, ... for the others); (3) per model, the layer-importance
analysis (`analysis`: paired ambient / critical / undetermined labels) and
the half-width ranking (`experiment/halfwidth.py`), then its arms at every
cost level (`experiment/arms.py`); (4) the client learning rate of each arm
picked on dev from `comparison.lr_grid`; (5) the final federated runs to the
withheld short-form domain, one client per speaker
(`experiment/design.py`); (6) optional stability runs; (7) client costs
(parameters, FLOPs, peak memory, measured step time), the verdict
(`experiment/verdict.py`), W/report.md and its figures.

The arms, each at every cost level of `comparison.levels` (fractions of the
full client's trainable parameters): full; targeted (rank-proportional
rates on the modules not labelled critical); anti_targeted (the mirror, on
the most important modules); uniform (one rate everywhere); random (the
same rates on `comparison.random_draws` random module draws);
targeted_rescaled (targeted with inverted dropout); freeze (the ambient
modules not trained); uniform_ordered, uniform_static, uniform_rolling (the
uniform arm's rate and cost, units chosen by the sub-model policies of
FjORD, HeteroFL and FedRolex, `federated.dropout.policy`; uniform itself
keeps random units), controls compared with full and with uniform.

The verdict's cost level is 0.85 (demo and study). The targeted arm thins
only modules not labelled critical, at most `max_rate` of each; a model
with few of them cannot reach a deeper cut (the study's models, seed
0: 9 non-critical modules, 0 ambient, reach 0.85 and no level below 0.80;
seed 1: 19 reach 0.70), and an arm that cannot reach the level is reported
absent, never rescaled. Deeper levels (the `comparison.levels` override)
show how the arms that can reach them degrade.

The verdict, fixed here before any run (`comparison.margin` delta,
`comparison.confidence`): confirmed when the upper bound of targeted - full
is below delta and the lower bound of anti_targeted - targeted above 0;
refuted when the lower bound of targeted - full is above delta or
anti_targeted - targeted lies inside +-delta; otherwise inconclusive.
Intervals: hierarchical paired bootstrap over pre-trained models, federated
seeds, speakers and utterances (`conformer_fl.stats`).

Scales:
  demo   the miniature `make demo` runs, sized to about half an hour on a
         2-core CPU host: the 'demo' corpus (64+8+8 speakers), the demo8x64
         model (8 blocks x 64), 1200 pre-training steps (Adam, peak 1e-3
         after 300 warm-up steps, no SpecAugment or dropout) on the corpus's
         'story' long form, the leave-Flite-out model for 600 steps, the
         analysis on 12 dev batches, one pre-trained model, one cost level
         (0.85), arms full, targeted, anti_targeted, uniform and freeze over
         one federated seed, one client learning rate (no tuning). It cannot
         decide the claim: one pre-trained model and one seed give intervals
         too wide for the margin; its report says so.
  study  the test: the 'study' corpus (96+8+8 speakers, 25 long + 30 short
         utterances each), 2 pre-trained models (seeds 0 and 1) of 2400
         steps, the leave-Flite-out model for 1200 steps, the analysis on 20
         dev batches, each model analysed with its own arms at the
         verdict's level 0.85: full, targeted, anti_targeted, uniform, 3
         random draws, the rescaling
         ablation, freeze and the three policy arms; the verdict's arms over
         5 federated seeds, the others over 1; one client learning rate
         (0.2) for every arm. Cut to fit a few hours on a 2-core CPU host
         (docs/results.md has the measured wall time): the learning-rate
         grid (per-arm tuning on dev is
         `--config.comparison.lr_grid='(0.1, 0.2, 0.4)'`, 3 runs per arm
         more), the controls' second seed
         (`--config.comparison.control_seeds='(0, 1)'`), the deeper levels
         (`--config.comparison.levels='(0.85, 0.7, 0.55)'`), which the
         targeted, anti_targeted and random arms of model 0 cannot reach, and
         a second random halving per module in the half-width ranking
         (`halfwidth_draws`). The control arms (one seed each), the 5 x 2
         replication of the verdict's arms and the margin are not cut.
  tiny   the test of the pipeline (a minute): tiny model, one level, four
         arms.

Argument (all optional, `key=value,...`):
  scale    demo | study | tiny                                       (demo)
  size     model size (the scale's: demo and study demo8x64, tiny tiny)
  norm     conv-module norm: group_norm | batch_norm | layer_norm   (group_norm)
  decoder  ctc | rnnt                                                (ctc)
  rounds   federated rounds per run (0 = the scale's default)        (0)
  steps    central pre-training steps (0 = the scale's default)      (0)
  stability_seeds, stability_norms, stability_sizes: optional stability
           runs (claims 2 and 3), '+'-separated: pre-training seeds x conv
           norms at the scale's size, and extra sizes at (norm, seed 0);
           none by default.
"""

from typing import Any

import ml_collections

from conformer_fl import config_lib

# Per scale: corpus and model size; pre-training steps, peak learning rate,
# warm-up, regularization (SpecAugment and dropout, or neither), the steps of
# the leave-one-engine-out model (0 = `steps`), buckets and tokenizer; analysis granularity, dev batches and
# re-randomization draws; federated rounds, clients per round, local steps,
# client batch and client learning rate; eval batches of the runs; targeting
# (units, metric); the default federated seeds.
_SCALES = {
    "demo": dict(corpus="demo", size="demo8x64", steps=1200, peak_lr=1e-3,
                 warmup=300, regularize=False, engine_check_steps=600,
                 buckets=(3.0, 4.5, 6.0), tokenizer="char",
                 granularity="module", analysis_batches=12,
                 rerandomize_seeds=0, rounds=40, clients=8, local_steps=4,
                 batch=4, eval_batches=12, pretrain_devices=1,
                 pretrain_seeds=(0,), levels=(0.85,), verdict_level=0.85,
                 arms=("full", "targeted", "anti_targeted", "uniform",
                       "freeze"),
                 random_draws=1, verdict_seeds=(0,), control_seeds=(0,),
                 level_seeds=(0,), lr_grid=(0.2,), halfwidth_draws=1),
    "tiny": dict(corpus="tiny", size="tiny", steps=6, peak_lr=2e-3, warmup=2,
                 regularize=True, engine_check_steps=0,
                 buckets=(10.0,), tokenizer="sentencepiece",
                 granularity="module", analysis_batches=1,
                 rerandomize_seeds=1, rounds=2, clients=4, local_steps=2,
                 batch=2, eval_batches=1, pretrain_devices=0,
                 pretrain_seeds=(0,), levels=(0.70,), verdict_level=0.70,
                 arms=("full", "targeted", "anti_targeted", "uniform"),
                 random_draws=1, verdict_seeds=(0,), control_seeds=(0,),
                 level_seeds=(0,), lr_grid=(0.05,), halfwidth_draws=1),
}
_SCALES["study"] = dict(
    _SCALES["demo"], corpus="study", steps=2400, engine_check_steps=1200,
    analysis_batches=20, pretrain_seeds=(0, 1), levels=(0.85,),
    arms=("full", "targeted", "anti_targeted", "uniform", "random",
          "targeted_rescaled", "freeze", "uniform_ordered", "uniform_static",
          "uniform_rolling"),
    random_draws=3, verdict_seeds=(0, 1, 2, 3, 4), control_seeds=(0,),
    level_seeds=(0,), lr_grid=(0.2,), halfwidth_draws=1)


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
  if s["regularize"]:
    # SpecAugment lighter than the LibriSpeech policy of the model's default
    # (10 time masks, 2 frequency masks of 27 bins).
    pretrain.model.specaug_num_time_masks = 2
    pretrain.model.specaug_num_freq_masks = 1
    pretrain.model.specaug_max_freq_mask = 15
  else:
    # No SpecAugment and no dropout: a model trained for minutes on the
    # augmented corpus underfits (training loss no lower than dev loss), and
    # the augmentation the corpus is built with is the only regularizer.
    pretrain.model.specaug_num_time_masks = 0
    pretrain.model.specaug_num_freq_masks = 0
    pretrain.model.dropout_rate = 0.0
    pretrain.model.attention_dropout_rate = 0.0
  # The demo pre-trains on one device: on a 2-core CPU host a step split
  # over 4 XLA CPU devices takes twice as long as on one (1.3 s against
  # 0.65 s, side by side). The federated rounds keep every device (4 clients
  # on 4 devices: 2.5 clients/s against 1.9 on one, same host).
  pretrain.central.num_devices = s["pretrain_devices"]
  return pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, scale="demo", size="", norm="group_norm",
                           decoder="ctc", rounds=0, steps=0,
                           stability_seeds="", stability_norms="",
                           stability_sizes="")
  if a.scale not in _SCALES:
    raise ValueError(f"scale={a.scale!r}; expected one of {sorted(_SCALES)}.")
  s = dict(_SCALES[a.scale])
  s["size"] = a.size or s["size"]
  steps = a.steps or s["steps"]
  rounds = a.rounds or s["rounds"]

  config = ml_collections.ConfigDict()
  config.mode = "experiment"
  # Pre-training seeds: one pre-trained model (with its own analysis and
  # arms) per seed; the intervals resample them.
  config.pretrain_seeds = tuple(s["pretrain_seeds"])
  # The split of the final evaluation of every run (held-out speakers).
  config.final_eval_split = "test"

  # (2) Central pre-training on the long-form domain (the seed is set per
  # model from pretrain_seeds).
  config.pretrain = _pretrain_config(s, s["size"], a.norm, a.decoder, seed=0,
                                     steps=steps)
  pretrain = config.pretrain

  # (3) Layer importance of each pre-trained model, on its own dev split:
  # units at module granularity (ffn1, mhsa, conv, ffn2 of every block).
  analysis = config_lib.analysis_run_config(granularity=s["granularity"],
                                            seeds=s["rerandomize_seeds"])
  analysis.analysis.eval_max_batches = s["analysis_batches"]
  # Reset to the initial value and to the middle checkpoint.
  analysis.analysis.taus = f"0,{pretrain.central.checkpoint_every}"
  # One variant at a time: faster than vmapped variants on 2 CPU cores for
  # the demo sizes (benchmarks/analysis_vectorized.py).
  analysis.analysis.vectorized = a.scale == "tiny"
  config.analysis = analysis

  # (5) Federated adaptation to the short-form domain, >= 8 clients a round.
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
  # Set per arm from comparison.lr_grid (the pick, or the only rate).
  f.client_optimizer.learning_rate = s["lr_grid"][0]
  # One compiled round per arm: every round padded to the one bucket, which
  # holds the short-form utterances (<= 2 s).
  adapt.data.bucket_seconds = (2.0,)
  f.fixed_round_shape = True
  # Dev WER every 5 rounds: the plateau curve and the learning-rate pick.
  f.eval_every = max(1, min(5, rounds // 2))
  f.checkpoint_every = max(1, rounds // 2)
  f.unit_granularity = s["granularity"]
  config.adapt = adapt

  # (3)-(7) The arms and the test (conformer_fl/experiment/arms.py,
  # design.py, verdict.py).
  config.arms = tuple(s["arms"])
  config.comparison = ml_collections.ConfigDict(dict(
      # Cost levels: fractions of the full client's trainable parameters.
      levels=tuple(s["levels"]),
      verdict_level=s["verdict_level"],
      # The non-inferiority margin delta (absolute WER) and the intervals'
      # confidence, fixed before the runs.
      margin=0.02,
      confidence=0.95,
      # No module loses more than this share of its units.
      max_rate=0.75,
      random_draws=s["random_draws"],
      # Federated seeds: the verdict's arms (full, targeted, anti_targeted)
      # at the verdict level; the other arms at that level; every arm at the
      # other levels.
      verdict_seeds=tuple(s["verdict_seeds"]),
      control_seeds=tuple(s["control_seeds"]),
      level_seeds=tuple(s["level_seeds"]),
      # Client learning rates tried per arm on dev (one = no tuning).
      lr_grid=tuple(s["lr_grid"]),
      # Random halvings per module of the half-width ranking.
      halfwidth_draws=s["halfwidth_draws"],
      # Timed runs of each arm's compiled client step (in turns).
      timing_repeats=2 if a.scale == "tiny" else 10,
      # The model gate: droppable modules labelled ambient in every
      # pre-trained model (the report shows the counts).
      gate_min_ambient=4,
  ))

  # (6) Leave one speech engine out (conformer_fl/experiment/engines.py): a
  # model pre-trained without this engine ('' = off), evaluated on its test
  # speakers and on the others'; steps 0 = config.pretrain's. The demo trains
  # it for half the steps of its main model: the held-out engine's WER is read
  # against the same model's in-domain WER.
  config.engine_check = ml_collections.ConfigDict(dict(
      leave_out="flite", steps=s["engine_check_steps"]))

  # (6) Claims 2 and 3 (optional): more pre-training runs, each analysed,
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
  seeds = [int(x) for x in _split(a.stability_seeds)]
  norms = _split(a.stability_norms) or (a.norm,)
  sizes = _split(a.stability_sizes)
  points = [(s["size"], norm, seed) for norm in norms for seed in seeds]
  points += [(size, a.norm, 0) for size in sizes]
  main = (s["size"], a.norm, 0)
  return {f"{size}_{norm}_seed{seed}": (size, norm, seed)
          for size, norm, seed in points if (size, norm, seed) != main}
