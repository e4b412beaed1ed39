"""Named model sizes and the config -> model factory.

A model config is a flat `ml_collections.ConfigDict` with one field per
attribute of the encoder's `ConformerConfig` (conformer.py) and one per other
attribute of `ConformerASR` (asr.py: front end, decoder); `build_model(config)`
is, after validation, `ConformerASR(encoder_config=ConformerConfig(**encoder
fields), **other fields)`.

Sizes (encoder blocks x width, heads, LSTM width; depthwise kernel 32):
  S: 16 x 144, 4 heads, LSTM 320   (paper: 10.3M parameters with RNN-T)
  M: 16 x 256, 4 heads, LSTM 640   (paper: 30.7M)
  L: 17 x 512, 8 heads, LSTM 640   (paper: 118.8M)
  demo: 4 x 96, 4 heads, kernel 15, LSTM 128 - the local CPU demo.
  demo_deep: 6 x 96, otherwise demo - the larger size of the demo's study.
  demo8x64: 8 x 64, 4 heads, kernel 15 - deeper and narrower than demo at
    about its FLOPs, with modules to spare for Federated Dropout.
  demo12x48: 12 x 48, 4 heads, kernel 15 - deeper and narrower still.
  tiny: 2 x 32, 2 heads, kernel 8, LSTM 32 - tests.

vocab_size includes the blank (id 0). Default 1024 for S/M/L (a 1k wordpiece
model, as in ContextNet/Conformer: with 4096 the decoder alone would put S
20% over the paper's 10.3M; see tests/test_conformer_shapes.py), 256 for demo
and 32 for tiny (the 28 characters of `conformer_fl.text.ALPHABET` + blank
fit). Training configs override it with the tokenizer's size.

Choices the paper leaves open, all config fields: the label-embedding width
(embed_dim) and the joint network's width (joint_dim) are 320 for S, M and L:
with them and vocab 1024 the three parameter counts land within 0.5% of the
paper's (with 640 for M and L, M would be 5.8% over); conv-module norm
(batch_norm by default, group_norm for federated runs), per-utterance feature
normalization,
SpecAugment (the LibriSpeech policy of the Conformer paper: 2 frequency masks
of up to 27 bins, 10 time masks of up to 5% of the utterance).
"""

from collections.abc import Mapping
import dataclasses
import re
from typing import Any

import ml_collections

from conformer_fl.models import asr
from conformer_fl.models import conformer

_SIZES: dict[str, dict[str, Any]] = {
    "S": dict(num_blocks=16, model_dim=144, num_heads=4, lstm_dim=320,
              embed_dim=320, joint_dim=320, conv_kernel_size=32,
              vocab_size=1024),
    "M": dict(num_blocks=16, model_dim=256, num_heads=4, lstm_dim=640,
              embed_dim=320, joint_dim=320, conv_kernel_size=32,
              vocab_size=1024),
    "L": dict(num_blocks=17, model_dim=512, num_heads=8, lstm_dim=640,
              embed_dim=320, joint_dim=320, conv_kernel_size=32,
              vocab_size=1024),
    "demo": dict(num_blocks=4, model_dim=96, num_heads=4, lstm_dim=128,
                 embed_dim=128, joint_dim=128, conv_kernel_size=15,
                 vocab_size=256),
    "demo_deep": dict(num_blocks=6, model_dim=96, num_heads=4, lstm_dim=128,
                      embed_dim=128, joint_dim=128, conv_kernel_size=15,
                      vocab_size=256),
    "demo8x64": dict(num_blocks=8, model_dim=64, num_heads=4, lstm_dim=128,
                     embed_dim=128, joint_dim=128, conv_kernel_size=15,
                     vocab_size=256),
    "demo12x48": dict(num_blocks=12, model_dim=48, num_heads=4, lstm_dim=128,
                      embed_dim=128, joint_dim=128, conv_kernel_size=15,
                      vocab_size=256),
    "tiny": dict(num_blocks=2, model_dim=32, num_heads=2, lstm_dim=32,
                 embed_dim=32, joint_dim=32, conv_kernel_size=8,
                 vocab_size=32),
}

SIZES = tuple(_SIZES)
# The model config fields that a size sets.
SIZE_FIELDS = tuple(sorted({field for size in _SIZES.values() for field in size}))
DECODERS = ("ctc", "rnnt")
FEATURE_NORMALIZATIONS = ("utterance", "none")


# The flat config's fields that make up ConformerASR.encoder_config (all but
# the sub-model's kept units, which `build_model` takes apart).
ENCODER_FIELDS = tuple(
    field.name for field in dataclasses.fields(conformer.ConformerConfig)
    if field.name not in ("kept_units", "rescale_kept"))
# ConformerASR attributes that are no config fields.
_NOT_FIELDS = ("parent", "name", "encoder_config")


def _defaults() -> dict[str, Any]:
  """Every model config field with its default value, encoder fields first."""
  defaults = {field.name: field.default
              for field in dataclasses.fields(conformer.ConformerConfig)
              if field.name in ENCODER_FIELDS}
  defaults.update({field.name: field.default
                   for field in dataclasses.fields(asr.ConformerASR)
                   if field.name not in _NOT_FIELDS})
  return defaults


def get_model_config(size: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The config of a named size, with fields overridden by keyword.

  Args:
    size: One of SIZES ('S', 'M', 'L', 'demo', 'demo_deep', 'demo8x64',
      'demo12x48', 'tiny').
    **overrides: Any model config field, e.g. decoder='ctc',
      conv_norm='group_norm'.

  Returns:
    A validated, flat ConfigDict (module docstring).

  Raises:
    ValueError: unknown size, unknown field or invalid value (names it).
  """
  if size not in _SIZES:
    raise ValueError(f"Unknown model size {size!r}; expected one of {SIZES}.")
  values = _defaults()
  values.update(_SIZES[size])
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(f"Unknown model config field(s) {unknown}; known fields: "
                     f"{sorted(values)}.")
  values.update(overrides)
  config = ml_collections.ConfigDict(values)
  validate_config(config)
  return config


_DROPPABLE = re.compile(r"encoder/(block_(\d+)/(ffn1|ffn2|conv|mhsa))")


def _encoder_kept_units(config: ml_collections.ConfigDict,
                        kept_units: Mapping[str, int]
                        ) -> tuple[tuple[str, int], ...]:
  """`ConformerConfig.kept_units` of build_model's kept_units, checked."""
  full = dict(ffn1=config.ffn_mult * config.model_dim,
              ffn2=config.ffn_mult * config.model_dim,
              conv=config.model_dim, mhsa=config.num_heads)
  encoder_units = []
  for name, kept in sorted(kept_units.items()):
    match = _DROPPABLE.fullmatch(name)
    if (match is None or int(match.group(2)) >= config.num_blocks or
        match.group(2) != f"{int(match.group(2)):02d}"):
      raise ValueError(f"kept_units: {name!r} is no droppable module of a"
                       f" {config.num_blocks}-block model (expected"
                       " 'encoder/block_NN/ffn1|mhsa|conv|ffn2').")
    kind = match.group(3)
    if not 0 < kept <= full[kind]:
      raise ValueError(f"kept_units: {name}={kept}, expected 1 to"
                       f" {full[kind]}.")
    if (kind == "conv" and config.conv_norm == "group_norm" and
        kept % config.conv_norm_groups):
      raise ValueError(f"kept_units: {name}={kept} is not a multiple of"
                       f" conv_norm_groups={config.conv_norm_groups}.")
    encoder_units.append((match.group(1), int(kept)))
  return tuple(encoder_units)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field of a model config."""
  known = set(_defaults())
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    raise ValueError(f"Unknown model config field(s) {unknown}.")
  missing = sorted(known - set(config.keys()))
  if missing:
    raise ValueError(f"Model config lacks field(s) {missing}.")
  choices = {
      "conv_norm": conformer.CONV_NORMS,
      "depthwise_impl": conformer.DEPTHWISE_IMPLS,
      "decoder": DECODERS,
      "feature_normalization": FEATURE_NORMALIZATIONS,
  }
  for field, allowed in choices.items():
    if config[field] not in allowed:
      raise ValueError(f"Model config field {field}={config[field]!r}; "
                       f"expected one of {allowed}.")
  positive = ("num_blocks", "model_dim", "num_heads", "ffn_mult",
              "conv_kernel_size", "conv_norm_groups", "vocab_size",
              "embed_dim", "lstm_dim", "joint_dim", "max_symbols_per_step",
              "num_mel_bins")
  for field in positive:
    if not isinstance(config[field], int) or config[field] < 1:
      raise ValueError(f"Model config field {field}={config[field]!r} must be "
                       "a positive integer.")
  if config.model_dim % config.num_heads:
    raise ValueError(f"Model config: num_heads={config.num_heads} does not "
                     f"divide model_dim={config.model_dim}.")
  if (config.conv_norm == "group_norm" and
      config.model_dim % config.conv_norm_groups):
    raise ValueError(f"Model config: conv_norm_groups={config.conv_norm_groups}"
                     f" does not divide model_dim={config.model_dim}.")
  for field in ("dropout_rate", "attention_dropout_rate"):
    if not 0.0 <= config[field] < 1.0:
      raise ValueError(f"Model config field {field}={config[field]!r} must lie "
                       "in [0, 1).")
  if config.vocab_size < 2:
    raise ValueError("Model config field vocab_size must be >= 2 (blank + one "
                     "token).")


def build_model(config: ml_collections.ConfigDict,
                kept_units: Mapping[str, int] | None = None,
                rescale_kept: bool = False) -> asr.ConformerASR:
  """ConformerASR of a (validated) flat model config (module docstring).

  Args:
    config: the flat model config.
    kept_units: a Federated Dropout sub-model's widths, {droppable module
      ('encoder/block_03/ffn1', 'encoder/block_03/conv',
      'encoder/block_03/mhsa'): the hidden units, inner channels or heads it
      keeps} (`SubmodelSpec.kept_units`); None or {} = the full model.
    rescale_kept: multiply the output of each thinned module by full / kept
      units (inverted dropout; `ConformerConfig.rescale_kept`).

  Raises:
    ValueError: a kept_units key that names no droppable module of the model,
      or a width outside 1 .. the full width.
  """
  validate_config(config)
  encoder_config = conformer.ConformerConfig(
      **{field: config[field] for field in ENCODER_FIELDS},
      kept_units=_encoder_kept_units(config, kept_units or {}),
      rescale_kept=bool(rescale_kept))
  return asr.ConformerASR(
      encoder_config=encoder_config,
      **{field: config[field] for field in config.keys()
         if field not in ENCODER_FIELDS})
