"""Building blocks of the experiment configs in `configs/`.

Each `configs/NAME.py` composes these into one `ml_collections.ConfigDict` and
documents the command that runs it. Every field is documented here, where it is made.

Every optional clip and rate is off at 0 (`--config.FIELD=0`):
central.clip_grad_norm, federated.client_optimizer.clip_grad_norm,
federated.clip_update_norm, data.max_label_rate, model.dropout_rate,
model.attention_dropout_rate, SpecAugment (model.specaug_num_freq_masks,
specaug_num_time_masks, specaug_max_freq_mask, specaug_max_time_mask_ratio) and
federated.dropout.default_rate, and loss_guard.factor.
data.skip_ctc_unalignable and allow_unverified_checkpoints are switches (False
= off).
"""

import os

import ml_collections
from ml_collections import config_dict

from conformer_fl import models
from conformer_fl.data import data_config as data_config_lib
from conformer_fl.data import paths

# Where TFDS datasets are built and read: $TFDS_DATA_DIR, else a cache folder.
DEFAULT_DATA_DIR = paths.DEFAULT_DATA_DIR


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument `key=value,key=value` over `defaults`.

  `configs/federated.py:size=S,norm=group_norm` passes "size=S,norm=group_norm". Values
  keep the type of their default (int, float, bool or str).

  Raises:
    ValueError: a key that has no default, or a value of the wrong type.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(
          f"Bad config argument {item!r}: expected key=value with key one of"
          f" {sorted(defaults)}"
      )
    default = defaults[key]
    if isinstance(default, bool):
      if value not in ("true", "false", "True", "False", "1", "0"):
        raise ValueError(f"Config argument {key} must be true or false, got {value!r}")
      parsed[key] = value in ("true", "True", "1")
    else:
      parsed[key] = type(default)(value)
  return parsed


def data_config(builder_config: str = "demo") -> ml_collections.ConfigDict:
  """The corpus, tokenizer and batching (fields: `data_config.default_data_config`).

  The synthetic corpus is read from (and built into) DEFAULT_DATA_DIR.
  """
  config = data_config_lib.default_data_config()
  config.builder_config = builder_config
  config.data_dir = DEFAULT_DATA_DIR
  return config


# Groups of the conv-module group norm in the experiment configs: 4 groups
# divide every model width (32, 96, 144, 256, 512).
GROUP_NORM_GROUPS = 4


def model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  """The Conformer (see `conformer_fl.models.get_model_config` for its fields).

  With conv_norm="group_norm" the norm has GROUP_NORM_GROUPS groups unless
  conv_norm_groups is given.
  """
  if overrides.get("conv_norm") == "group_norm":
    overrides.setdefault("conv_norm_groups", GROUP_NORM_GROUPS)
  return models.get_model_config(size, **overrides)


def data_config_for_corpus(corpus: str) -> ml_collections.ConfigDict:
  """`data_config` for a synthetic corpus size, or for "librispeech".

  LibriSpeech is read from $TFDS_DATA_DIR (prepared beforehand, as on TPU pods),
  with a 1024-piece sentencepiece vocabulary, buckets up to 36 s, 8 labels per
  second of audio, and the training split streamed rather than cached.
  """
  if corpus == "librispeech":
    config = data_config("")
    config.dataset = "librispeech"
    config.data_dir = os.environ.get("TFDS_DATA_DIR", "")
    config.bucket_seconds = (6.0, 12.0, 18.0, 36.0)
    config.tokenizer.vocab_size = 1024
    # 960 h do not fit in host memory; stream the training split instead.
    config.cache_train_in_memory = False
    # 1024 wordpieces of read English run at about 3-5 per second; 8 leaves a
    # margin (check with input_pipeline.max_labels_per_second) and keeps the
    # RNN-T joint's label axis short. Longer transcripts are skipped, counted.
    config.labels_per_second = 8.0
    config.batch_size = 64
    config.eval_batch_size = 64
    return config
  return data_config(corpus)


def federated_config(server: str = "fedavg",
                     rounds: int = 60) -> ml_collections.ConfigDict:
  """Federated training fields.

  Fields:
    rounds: rounds to run.
    clients_per_round: C; must divide over the devices of the mesh.
    local_steps: K local steps per client and round.
    local_epochs: 0 = K full steps; E > 0 = E passes over the client's data,
      capped at K steps (clients with little data then run fewer steps).
    client_batch_size: B utterances per local step.
    fixed_round_shape: pad every round to the longest bucket (one compiled shape)
      instead of the longest bucket the round needs.
    client_optimizer: name ('sgd' | 'adam', state reset every round),
      learning_rate, clip_grad_norm (clip each local gradient to this global
      L2 norm; 0 = off).
    server_optimizer: name ('fedavg' | 'fedavgm' | 'fedadam' | 'fedyogi') and
      learning_rate, with momentum (fedavgm) or b1, b2, eps (fedadam, fedyogi).
      Unset (None) fields take the defaults of the name
      (`optimizers.SERVER_DEFAULTS`: fedavg lr 1.0; fedavgm lr 1.0, momentum
      0.9; fedadam and fedyogi lr 1e-2, b1 0.9, b2 0.99, eps 1e-3), so
      `--config.federated.server_optimizer.name=fedadam` alone runs FedAdam
      with its own learning rate; a field that is set wins.
    clip_update_norm: clip each client's update to this L2 norm (0 = off).
    aggregation_weight: each client's weight in the server's mean update
      (conformer_fl/federated/round_data.py): 'examples_trained' (the
      examples it trained on this round, repeats counted), 'client_size'
      (its own examples, each once: McMahan et al.'s n_k) or 'uniform' (1
      per client with data). Default 'examples_trained', so that the results
      of workdirs made with it reproduce and their runs resume; with
      local_epochs = E > 0 (and no cap by K) it equals E * client_size, the
      McMahan weighting. With local_epochs = 0 every client with data trains
      K*B examples and weighs the same (then it is 'uniform'); choose
      'client_size' to weigh by data there.
    init_workdir: start from this (central) run's checkpoint; its tokenizer is
      reused. '' = random initialization.
    init_step: which checkpoint of init_workdir (-1 = the latest).
    unit_granularity: 'block' or 'module': the units whose server-update norms
      are logged every round (`update_norm/<unit>`).
    log_every, eval_every, checkpoint_every: cadence in rounds.
    dropout: Federated Dropout (conformer_fl/federated/dropout.py): each
      client of a round trains a sub-model keeping a subset of the units
      of the targeted layers (`policy`), gathered into smaller weight
      matrices.
      kind: 'none' (full model) | 'uniform' (default_rate on every targeted
        layer) | 'targeted' (per-unit rates, default_rate elsewhere).
      rates: {unit pattern: rate in [0, 1)} (kind='targeted' only). A
        pattern (conformer_fl/unit_patterns.py) is an fnmatch glob over
        unit names that also selects everything below a name it matches:
        an exact name 'encoder/block_03/ffn1', a block 'encoder/block_05',
        '*/conv' (every conv module), 'encoder/block_0[01]/*'; e.g.
        --config.federated.dropout.rates='{"*/conv": 0.5}'. A pattern that
        matches no unit is an error. Where several patterns select a
        layer, the most specific wins: the one selecting the fewest
        droppable layers ('encoder/block_03/ffn1' over 'encoder/block_03'
        over '*/ffn1' with 8 blocks); equally specific ones with different
        rates are an error. The experiment (conformer_fl/experiment/arms.py)
        builds rates from analysis/importance.json.
      default_rate: rate of the targeted layers that no pattern selects.
      unit_kinds: the layers targeted, some of 'ffn' (the ffn_mult*D hidden
        units of ffn1/ffn2), 'conv' (conv-module channels, kept within each
        group-norm group), 'mhsa' (attention heads).
      freeze_units: patterns like the keys of rates, matched against every
        subtree of the params (a unit or anything inside one), e.g.
        ("encoder/block_00", "*/conv"): the topmost subtrees they select are
        not trained by the clients at all (any kind; applies with every
        `kind`, also 'none'); a pattern that matches nothing is an error.
      rescale: inverted dropout: each thinned module's output is multiplied
        by n / k (full over kept units) on the clients, so that the
        sub-model's forward pass matches the full model's in expectation;
        False = the kept units' outputs unscaled.
      policy: which units a client keeps (the same count k of n for every
        client; within each group-norm group for 'conv'):
        'random' (Caldas et al. 2018, the default): a fresh random subset
          per client and round;
        'ordered' (FjORD, Horvath et al. 2021): the leading units 0..k-1;
        'static' (HeteroFL, Diao et al. 2021): a fixed leading slice per
          capacity level; with the one capacity level of a run it keeps
          the same units as 'ordered';
        'rolling' (FedRolex, Alam et al. 2022): the k consecutive units
          from unit r mod n at round r, wrapping around (mod n).
        kind='targeted' with any policy: rates by layer importance set how
        many units each layer keeps, the policy which ones.
      tiers: clients of mixed capacity in one round: ((fraction, width),
        ...), e.g. ((0.4, 1.0), (0.3, 0.75), (0.3, 0.5)); fractions sum to
        1, tier t takes round(fraction * clients_per_round) clients (a
        multiple of the mesh's devices) and its layers of `unit_kinds` keep
        width * (1 - rate) of their units (any kind, 'none' included:
        rate 0). Each tier is vmapped at its own widths in the one compiled
        round (conformer_fl/federated/tiers.py); the server averages each
        element over the clients of every tier that trained it. () = one
        tier, every client at the rates' widths.
      A layer keeps round((1 - rate) * n) of its n units (>= 1), the same
      count for every client of a tier.
  """
  # Every field of every server optimizer, unset: `optimizers` fills them in
  # from `server`'s (or an overriding name's) defaults.
  server_optimizer = dict(
      name=server, **{field: config_dict.placeholder(float) for field in (
          "learning_rate", "momentum", "b1", "b2", "eps")})
  return ml_collections.ConfigDict(dict(
      rounds=rounds,
      clients_per_round=8,
      local_steps=4,
      local_epochs=0,
      client_batch_size=4,
      fixed_round_shape=False,
      client_optimizer=dict(name="sgd", learning_rate=0.05, clip_grad_norm=5.0),
      server_optimizer=server_optimizer,
      clip_update_norm=0.0,
      aggregation_weight="examples_trained",
      init_workdir="",
      init_step=-1,
      unit_granularity="module",
      log_every=1,
      eval_every=10,
      checkpoint_every=10,
      dropout=dict(
          kind="none",
          rates={},
          default_rate=0.0,
          unit_kinds=("ffn", "conv", "mhsa"),
          freeze_units=(),
          rescale=False,
          policy="random",
          tiers=(),
      ),
  ))


# ----------------------------------------------------------------------------
# Whole run configs, one per mode; `configs/*.py` call these.


def _run_config(mode: str, seed: int, corpus: str, size: str, norm: str,
                decoder: str) -> ml_collections.ConfigDict:
  """The fields every training mode has: mode, seed, data, model, eval, faults.

  data.skip_ctc_unalignable is on for CTC: an utterance with more labels (plus
  one per repeated label) than encoder frames (25 per second of audio:
  `batching.encoder_frames`, which counts them for the model's default 25 ms /
  10 ms log-mel frames and 4x subsampling) cannot be aligned, its loss is ~1e5,
  and it is skipped and counted ('ctc_unalignable'). The tiny and demo corpora
  lose no utterance to it (read speech has at most ~23 characters per second
  there). RNN-T can emit several labels per frame and keeps them.
  """
  config = ml_collections.ConfigDict()
  config.mode = mode
  config.seed = seed
  config.data = data_config_for_corpus(corpus)
  config.data.skip_ctc_unalignable = decoder == "ctc"
  config.model = model_config(size, conv_norm=norm, decoder=decoder)
  # Evaluate on at most this many eval batches (0 = the whole eval split).
  config.eval_max_batches = 0
  # Resume from a checkpoint whose checksums are missing (its
  # _CHECKPOINT_METADATA deleted or torn), with a warning, instead of falling
  # back to the newest step that has them (conformer_fl/checkpointing.py).
  config.allow_unverified_checkpoints = False
  # The loss-explosion guard (conformer_fl/training/divergence.py): the run stops when
  # `patience` logged training losses in a row are above `factor` times the
  # median of the last `window` accepted ones (0 = off). A CTC model's
  # training loss falls: in the tiny runs of configs/central.py and
  # configs/federated.py no logged loss exceeds 1.8x that median, while a
  # client or server learning rate of 1e6 sends it to 1e5 (CTC's floor for
  # outputs that cannot align) and on to 1e14 within two rounds.
  config.loss_guard = ml_collections.ConfigDict(dict(
      factor=10.0, patience=3, window=20))
  return config


def central_run_config(size: str = "demo", norm: str = "group_norm",
                       decoder: str = "ctc", corpus: str = "demo",
                       domain: str = "long", steps: int = 1200,
                       seed: int = 0) -> ml_collections.ConfigDict:
  """Central pre-training (configs/central.py documents the arguments).

  Fields: mode, seed, data (`data_config`), model (`model_config`),
  eval_max_batches (0 = the whole eval split), allow_unverified_checkpoints
  and loss_guard (`_run_config` documents both) and central:
    num_steps; peak_learning_rate, warmup_steps (linear warm-up, then
    inverse-square-root decay); b1, b2, eps (Adam); clip_grad_norm (0 = off);
    log_every, eval_every, checkpoint_every (steps; step 0 is always saved);
    frozen_units: unit patterns (conformer_fl/unit_patterns.py: fnmatch
    globs over the `models.list_units` names at module granularity; a
    pattern also selects the units below a name it matches) whose weights
    stay at their initial value, e.g. ("encoder/block_01/conv",),
    ("encoder/block_00",) (its five modules) or, on the command line,
    --config.central.frozen_units='("encoder/block_0[01]/*",)'; a pattern
    that matches no unit is an error naming the field and the units;
    num_devices: the batch is split over the first num_devices devices (0 =
    every device of every process; k > 0 needs one process). On a CPU,
    XLA's virtual devices (--xla_force_host_platform_device_count) share the
    cores, so one device is faster on a CPU host than several virtual
    devices (configs/experiment.py sets it).
  """
  config = _run_config("central", seed, corpus, size, norm, decoder)
  config.data.train_domains = () if domain == "all" else (domain,)
  config.data.eval_domains = config.data.train_domains
  config.central = ml_collections.ConfigDict(dict(
      num_steps=steps,
      peak_learning_rate=2e-3,
      warmup_steps=200,
      b1=0.9,
      b2=0.98,
      eps=1e-9,
      clip_grad_norm=5.0,
      log_every=20,
      eval_every=200,
      checkpoint_every=100,
      frozen_units=(),
      num_devices=0,
  ))
  return config


def federated_run_config(size: str = "demo", norm: str = "group_norm",
                         decoder: str = "ctc", corpus: str = "demo",
                         domain: str = "short", server: str = "fedavg",
                         rounds: int = 60,
                         seed: int = 0) -> ml_collections.ConfigDict:
  """Federated training (configs/federated.py documents the arguments).

  Fields: mode, seed, data, model, eval_max_batches,
  allow_unverified_checkpoints, loss_guard (`_run_config`) and federated
  (`federated_config`). The clients are the speakers of `domain`. Their data
  is read from disk per round (conformer_fl/data/record_source.py): the corpus
  must be prepared in the array_record format. LibriSpeech has no domains of
  its own: domain=all takes every utterance (the paper's federated
  LibriSpeech by speaker), short / long split it by duration
  (data.librispeech_domain_mode='by_duration', short = at most
  data.short_max_seconds).
  """
  config = _run_config("federated", seed, corpus, size, norm, decoder)
  if corpus == "librispeech" and domain != "all":
    config.data.librispeech_domain_mode = "by_duration"
  config.data.client_domains = () if domain == "all" else (domain,)
  config.data.eval_domains = config.data.client_domains
  config.federated = federated_config(server=server, rounds=rounds)
  return config


def analysis_run_config(granularity: str = "block", seeds: int = 3,
                        variants: int = 8) -> ml_collections.ConfigDict:
  """The layer-importance pass (configs/analysis.py documents the arguments)."""
  config = ml_collections.ConfigDict()
  config.mode = "analysis"
  analysis = config.analysis = ml_collections.ConfigDict()
  # Units: `conformer_fl.models.list_units` at this granularity.
  analysis.granularity = granularity
  # Re-initialization checkpoints tau: "all" (every saved step up to the
  # trained one) or comma-separated steps, e.g. "0,100,400". Step 0 (the
  # initial value, which decides ambient vs critical) is always included.
  analysis.taus = "all"
  # The "trained" checkpoint T whose units are reset; -1 = the latest.
  analysis.trained_step = -1
  # Re-randomization: fresh draws of each unit from its initializer, by
  # initializing the model with seed run_seed + rerandomize_seed_offset + i.
  analysis.num_rerandomize_seeds = seeds
  analysis.rerandomize_seed_offset = 1000
  # Evaluation data: "" / None = the run's own config.data fields.
  analysis.eval_split = ""
  analysis.eval_domains = config_dict.placeholder(tuple)
  analysis.data_dir = ""
  analysis.eval_max_batches = 0  # 0 = the whole split.
  # The threshold: the WER increase after the tau=0 reset against
  # max_abs_wer_increase (WER points, 0.01 = 1%) and relative to the baseline
  # WER against max_rel_wer_increase; threshold_rule "either" calls a unit
  # ambient when one test passes, "both" when both do.
  analysis.max_abs_wer_increase = 0.01
  analysis.max_rel_wer_increase = 0.05
  analysis.threshold_rule = "either"
  # Labels from paired intervals of each unit's WER increase (speakers, then
  # utterances resampled; conformer_fl.stats): ambient when the upper bound
  # lies below the threshold, critical when the lower bound lies above it,
  # undetermined otherwise.
  analysis.label_confidence = 0.95
  analysis.bootstrap_samples = 2000
  # Claim 4's primary test (conformer_fl/analysis/movement_test.py): this
  # movement measure ('relative_distance' = ||w_T - w_0|| / ||w_0||, or
  # 'rms_movement' = ||w_T - w_0|| / sqrt(parameters)) against the WER
  # increase over the droppable modules, p-values from this many
  # permutations within module types. Other correlations are secondary.
  analysis.movement_measure = "relative_distance"
  analysis.movement_permutations = 10000
  # Evaluation: variants stacked on a leading axis and vmapped, this many per
  # compiled call (bounds memory: each holds a full copy of the variables),
  # split over every device of every process and rounded up to a multiple of
  # the devices. vectorized=False evaluates one variant at a time (one
  # process only). Which is faster depends on the model and the hardware (on
  # a CPU the vmapped path speeds up a tiny model and can slow down a larger
  # one): benchmarks/analysis_vectorized.py measures both.
  analysis.variants_per_call = variants
  analysis.vectorized = True
  # Stability: workdirs of other runs (seeds, sizes, batch vs group norm)
  # whose analysis/importance.json already exists; compared with this run.
  analysis.compare_workdirs = ()
  return config
