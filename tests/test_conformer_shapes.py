"""Output shapes of the tiny model and parameter counts of S, M and L.

Parameter counts use jax.eval_shape (no large model is initialized). They are
checked three ways: against the number written here, against a closed-form
count derived by hand from the architecture, and against the paper's 10.3M /
30.7M / 118.8M (RNN-T, vocab 1024, embed and joint width 320: see sizes.py).
"""

import dataclasses
import math

import jax
import numpy as np
import pytest

from conformer_fl import models
from conformer_fl.models import decoders
from conformer_fl.models import decoding

SAMPLES = 8000  # 0.5 s: 48 log-mel frames, 12 encoder frames.
LABELS = 5


def _batch(vocab_size: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  audio_paddings = np.zeros((2, SAMPLES), np.float32)
  audio_paddings[1, 5000:] = 1.0
  label_paddings = np.zeros((2, LABELS), np.float32)
  label_paddings[1, 3:] = 1.0
  labels = rng.integers(1, vocab_size, (2, LABELS)).astype(np.int32)
  labels[label_paddings > 0] = 0
  return {
      "audio": rng.uniform(-0.5, 0.5, (2, SAMPLES)).astype(np.float32),
      "audio_paddings": audio_paddings,
      "labels": labels,
      "label_paddings": label_paddings,
  }


def _init_shapes(config, batch):
  model = models.build_model(config)
  init = lambda rng: model.init(rng, batch["audio"], batch["audio_paddings"],
                                batch["labels"], batch["label_paddings"],
                                train=False)
  return jax.eval_shape(init, jax.random.key(0))


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _hand_count(c) -> int:
  """Parameters of the model, counted by hand from the architecture."""
  d, k, v = c.model_dim, c.conv_kernel_size, c.vocab_size
  layer_norm = 2 * d
  ffn = layer_norm + (d * 4 * d + 4 * d) + (4 * d * d + d)
  mhsa = layer_norm + 3 * (d * d + d) + d * d + 2 * d + (d * d + d)
  conv = layer_norm + (d * 2 * d + 2 * d) + k * d + 2 * d + (d * d + d)
  block = 2 * ffn + mhsa + conv + layer_norm
  freq_after = math.ceil(math.ceil(c.num_mel_bins / 2) / 2)
  subsampling = (9 * d + d) + (9 * d * d + d) + (freq_after * d * d + d)
  e, p, j = c.embed_dim, c.lstm_dim, c.joint_dim
  rnnt = v * e + 4 * e * p + 4 * (p * p + p) + (d * j + j) + p * j + (
      j * v + v)
  ctc = d * v + v
  decoder = rnnt if c.decoder == "rnnt" else ctc
  return subsampling + c.num_blocks * block + decoder


@pytest.fixture(scope="module")
def tiny_outputs():
  results = {}
  for decoder in ("ctc", "rnnt"):
    config = models.get_model_config("tiny", decoder=decoder)
    model = models.build_model(config)
    batch = _batch(config.vocab_size)
    args = (batch["audio"], batch["audio_paddings"], batch["labels"],
            batch["label_paddings"])
    variables = jax.jit(lambda rng: model.init(rng, *args, train=False))(
        jax.random.key(0))
    outputs = jax.jit(lambda v: model.apply(v, *args, train=False))(variables)
    results[decoder] = (config, variables, outputs)
  return results


@pytest.mark.parametrize("decoder", ["ctc", "rnnt"])
def test_tiny_output_shapes(tiny_outputs, decoder):
  config, variables, outputs = tiny_outputs[decoder]
  # 8000 samples -> 1 + (8000 - 400) // 160 = 48 frames -> ceil(48 / 4) = 12.
  # Example 1 has 5000 valid samples -> 29 valid frames -> 8 = ceil(29 / 4).
  assert outputs["encoded"].shape == (2, 12, config.model_dim)
  np.testing.assert_array_equal(outputs["logit_paddings"].sum(axis=1),
                                [0.0, 4.0])
  expected = ((2, 12, config.vocab_size) if decoder == "ctc" else
              (2, 12, LABELS + 1, config.vocab_size))
  assert outputs["logits"].shape == expected
  assert np.all(np.isfinite(outputs["logits"]))
  # Encoder outputs at padded frames are exactly zero.
  assert np.all(np.asarray(outputs["encoded"])[1, 8:] == 0.0)
  assert _count(variables["params"]) == _hand_count(config)


# size -> (exact count with the default config, the paper's count).
EXPECTED_COUNTS = {
    "S": (10_336_512, 10.3e6),
    "M": (30_731_072, 30.7e6),
    "L": (118_596_928, 118.8e6),
}


@pytest.mark.parametrize("size", ["S", "M", "L"])
def test_paper_parameter_counts(size):
  config = models.get_model_config(size)
  assert config.decoder == "rnnt" and config.vocab_size == 1024
  shapes = _init_shapes(config, _batch(config.vocab_size))
  count = _count(shapes["params"])
  exact, paper = EXPECTED_COUNTS[size]
  assert count == exact
  assert count == _hand_count(config)
  assert abs(count / paper - 1.0) < 0.01
  assert shapes["batch_stats"]  # batch_norm is the default conv norm.


def test_vocab_4096_would_miss_the_paper():
  # Why vocab 1024: 4096 wordpieces put S about 19% over the paper's count.
  config = models.get_model_config("S", vocab_size=4096)
  count = _count(_init_shapes(config, _batch(1024))["params"])
  assert count == _hand_count(config)
  assert count / 10.3e6 - 1.0 > 0.15


def test_group_norm_has_no_batch_stats_and_same_count():
  config = models.get_model_config("tiny", conv_norm="group_norm",
                                   conv_norm_groups=4)
  shapes = _init_shapes(config, _batch(config.vocab_size))
  assert "batch_stats" not in shapes
  assert _count(shapes["params"]) == _hand_count(config)


@pytest.mark.parametrize("size,overrides,message", [
    ("XL", {}, "Unknown model size 'XL'"),
    ("tiny", {"num_layers": 3}, "['num_layers']"),
    ("tiny", {"conv_norm": "instance_norm"}, "conv_norm"),
    ("tiny", {"decoder": "las"}, "decoder"),
    ("tiny", {"depthwise_impl": "fft"}, "depthwise_impl"),
    ("tiny", {"num_heads": 3}, "num_heads=3"),
    ("tiny", {"conv_norm": "group_norm", "conv_norm_groups": 5},
     "conv_norm_groups=5"),
    ("tiny", {"dropout_rate": 1.5}, "dropout_rate"),
])
def test_bad_config_names_the_problem(size, overrides, message):
  with pytest.raises(ValueError, match=None) as error:
    models.get_model_config(size, **overrides)
  assert message in str(error.value)


def test_one_encoder_config_is_passed_down_and_the_model_hashes():
  """Each encoder field is declared once, in models.ConformerConfig."""
  config = models.get_model_config("tiny", decoder="ctc", num_blocks=3,
                                   conv_norm="group_norm", conv_norm_groups=4)
  # kept_units and rescale_kept, a sub-model's widths and scaling, are
  # build_model's arguments, not fields of the flat config (which describes
  # the full model).
  encoder_fields = [f.name for f in dataclasses.fields(models.ConformerConfig)
                    if f.name not in ("kept_units", "rescale_kept")]
  other_fields = [f.name for f in dataclasses.fields(models.ConformerASR)
                  if f.name not in ("parent", "name", "encoder_config")]
  assert not set(encoder_fields) & set(other_fields)
  assert set(config.keys()) == set(encoder_fields + other_fields)
  model = models.build_model(config)
  assert model.encoder_config == models.ConformerConfig(
      num_blocks=3, model_dim=32, num_heads=2, conv_kernel_size=8,
      conv_norm="group_norm", conv_norm_groups=4)
  assert (model.decoder, model.vocab_size) == ("ctc", 32)
  # Hashable and equal by value: evaluation.jitted_eval_step is an lru_cache
  # keyed by the model.
  assert hash(model) == hash(models.build_model(config))
  assert model == models.build_model(config)
  sub_model = models.build_model(config, kept_units={
      "encoder/block_01/ffn2": 16})
  assert sub_model.encoder_config.kept_units == (("block_01/ffn2", 16),)
  assert sub_model != model and hash(sub_model) == hash(
      models.build_model(config, kept_units={"encoder/block_01/ffn2": 16}))
  assert model != models.build_model(models.get_model_config(
      "tiny", decoder="ctc", num_blocks=2, conv_norm="group_norm",
      conv_norm_groups=4))
  # The encoder receives that very config; the tree keeps its names.
  shapes = _init_shapes(config, _batch(config.vocab_size))["params"]
  assert model.bind({"params": shapes}).encoder.config == model.encoder_config
  assert sorted(shapes) == ["decoder", "encoder"]
  assert sorted(shapes["encoder"]) == ["block_00", "block_01", "block_02",
                                       "subsampling"]
  assert sorted(shapes["encoder"]["block_02"]) == [
      "conv", "ffn1", "ffn2", "final_norm", "mhsa"]
  assert _count(shapes) == _hand_count(config)


@pytest.mark.parametrize("decoder", ["ctc", "rnnt"])
def test_one_decoder_interface(tiny_outputs, decoder):
  """The model picks its decoder once; loss and decode go through it."""
  config, variables, outputs = tiny_outputs[decoder]
  model = models.build_model(config)
  net = model.make_decoder()
  assert type(net) is {"ctc": decoders.CTCHead,
                       "rnnt": decoders.RNNTDecoder}[decoder]
  batch = _batch(config.vocab_size)
  labels = (batch["labels"], batch["label_paddings"])
  reference = (models.ctc_loss if decoder == "ctc" else models.rnnt_loss)(
      outputs["logits"], outputs["logit_paddings"], *labels)
  np.testing.assert_array_equal(
      net.loss(outputs["logits"], outputs["logit_paddings"], *labels),
      reference)
  loss, state = jax.jit(lambda v: models.per_example_loss(
      model, v, batch, train=False, rng=None))(variables)
  assert loss.shape == (2,) and state == {}
  np.testing.assert_allclose(loss, reference, rtol=1e-5)
  ids, paddings = jax.jit(lambda v: models.greedy_decode(model, v, batch))(
      variables)
  if decoder == "ctc":
    expected = decoding.ctc_greedy_decode(outputs["logits"],
                                          outputs["logit_paddings"])
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_array_equal(paddings, expected[1])
  else:
    assert ids.shape == paddings.shape == (2, 12 * config.max_symbols_per_step)
  with pytest.raises(ValueError, match="decoder must be 'ctc' or 'rnnt'"):
    models.ConformerASR(decoder="las").make_decoder()
