"""ConformerASR: log-mel front end, Conformer encoder, CTC or RNN-T decoder.

Parameter tree: {'encoder': {'subsampling', 'block_00', ...}, 'decoder': ...}
(the log-mel front end and SpecAugment have no parameters). With
conv_norm='batch_norm' the variables also hold a 'batch_stats' collection.

Module-level pure functions used by training and evaluation:
  per_example_loss(model, variables, batch, *, train, rng) -> (loss [B], state)
  greedy_decode(model, variables, batch) -> (ids [B, L], paddings [B, L])
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from conformer_fl.models import conformer
from conformer_fl.models import decoders
from conformer_fl.models import frontend

Array = jax.Array
Batch = dict[str, Any]
Variables = Any
PRNGKey = jax.Array

BLANK_ID = decoders.BLANK_ID


def normalize_per_utterance(features: Array, paddings: Array,
                            epsilon: float = 1e-5) -> Array:
  """Zero mean, unit variance per utterance and mel bin over valid frames.

  [B, T, F], [B, T] -> [B, T, F]; padded frames stay 0. Statistics over the
  valid frames only, so appending padding changes nothing.
  """
  mask = (1.0 - paddings)[..., None]
  count = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
  mean = jnp.sum(features * mask, axis=1, keepdims=True) / count
  var = jnp.sum(jnp.square(features - mean) * mask, axis=1,
                keepdims=True) / count
  return (features - mean) * jax.lax.rsqrt(var + epsilon) * mask


class ConformerASR(nn.Module):
  """The whole ASR model.

  The flat model config (conformer_fl/models/sizes.py, `build_model`) has one
  field per attribute of `encoder_config` and one per other attribute here.

  Attributes:
    encoder_config: The encoder's hyperparameters
      (`conformer.ConformerConfig`: num_blocks, model_dim, num_heads,
      ffn_mult, conv_kernel_size, conv_norm, conv_norm_groups,
      batch_norm_momentum, depthwise_impl, dropout_rate,
      attention_dropout_rate), passed down to the encoder and its blocks.
    decoder: 'ctc' | 'rnnt'.
    vocab_size: Output vocabulary including the blank (id 0).
    embed_dim: RNN-T label embedding width.
    lstm_dim: RNN-T prediction LSTM width.
    joint_dim: RNN-T joint hidden width.
    max_symbols_per_step: RNN-T greedy decoding: most tokens per frame.
    sample_rate: Audio sample rate in Hz.
    num_mel_bins: Log-mel channels F.
    frame_length_ms: Analysis window length.
    frame_step_ms: Hop between frames.
    feature_normalization: 'utterance' (mean/variance per utterance and bin
      over valid frames) | 'none'.
    specaug_num_freq_masks: SpecAugment frequency masks (0 disables).
    specaug_max_freq_mask: Widest frequency mask in bins.
    specaug_num_time_masks: SpecAugment time masks (0 disables).
    specaug_max_time_mask_ratio: Widest time mask as a fraction of length.
  """
  encoder_config: conformer.ConformerConfig = conformer.ConformerConfig()
  decoder: str = "rnnt"
  vocab_size: int = 32
  embed_dim: int = 32
  lstm_dim: int = 32
  joint_dim: int = 32
  max_symbols_per_step: int = 4
  sample_rate: int = 16000
  num_mel_bins: int = 80
  frame_length_ms: float = 25.0
  frame_step_ms: float = 10.0
  feature_normalization: str = "utterance"
  specaug_num_freq_masks: int = 2
  specaug_max_freq_mask: int = 27
  specaug_num_time_masks: int = 10
  specaug_max_time_mask_ratio: float = 0.05

  def setup(self):
    self.encoder = conformer.ConformerEncoder(config=self.encoder_config)
    self.decoder_net = self.make_decoder()

  @nn.nowrap
  def make_decoder(self) -> decoders.Decoder:
    """The decoder module named by `decoder`, its parameter subtree 'decoder'.

    The only place that asks which decoder the model has: `setup` builds the
    model's decoder with it, and `per_example_loss` / `greedy_decode` call
    the `loss` / `decode` of an unbound copy (models/decoders.py, `Decoder`).

    Raises:
      ValueError: an unknown decoder.
    """
    if self.decoder == "ctc":
      return decoders.CTCHead(self.vocab_size, name="decoder")
    if self.decoder == "rnnt":
      return decoders.RNNTDecoder(
          vocab_size=self.vocab_size, embed_dim=self.embed_dim,
          lstm_dim=self.lstm_dim, joint_dim=self.joint_dim,
          max_symbols_per_step=self.max_symbols_per_step, name="decoder")
    raise ValueError(f"decoder must be 'ctc' or 'rnnt', got "
                     f"{self.decoder!r}.")

  def features(self, audio: Array, audio_paddings: Array, *,
               train: bool) -> tuple[Array, Array]:
    """Log-mel (+ normalization, + SpecAugment when training).

    [B, S], [B, S] -> ([B, T, F], [B, T]). SpecAugment draws from the
    'specaug' rng stream.
    """
    features, paddings = frontend.log_mel(
        audio, audio_paddings, sample_rate=self.sample_rate,
        num_mel_bins=self.num_mel_bins, frame_length_ms=self.frame_length_ms,
        frame_step_ms=self.frame_step_ms)
    if self.feature_normalization == "utterance":
      features = normalize_per_utterance(features, paddings)
    if train and (self.specaug_num_freq_masks or self.specaug_num_time_masks):
      features = frontend.spec_augment(
          self.make_rng("specaug"), features, paddings,
          num_freq_masks=self.specaug_num_freq_masks,
          max_freq_mask=self.specaug_max_freq_mask,
          num_time_masks=self.specaug_num_time_masks,
          max_time_mask_ratio=self.specaug_max_time_mask_ratio)
    return features, paddings

  def encode(self, audio: Array, audio_paddings: Array, *,
             train: bool) -> tuple[Array, Array]:
    """[B, S], [B, S] -> encoder frames [B, T', D], paddings [B, T']."""
    features, paddings = self.features(audio, audio_paddings, train=train)
    return self.encoder(features, paddings, train=train)

  def __call__(self, audio: Array, audio_paddings: Array, labels: Array,
               label_paddings: Array, *, train: bool) -> dict[str, Array]:
    """Runs the model.

    Args:
      audio: float32 [B, S] waveform in [-1, 1].
      audio_paddings: float32 [B, S], 1.0 at padded samples.
      labels: int32 [B, U], 0 at padded positions.
      label_paddings: float32 [B, U].
      train: Dropout, SpecAugment and batch statistics on.

    Returns:
      'logits': CTC [B, T', V] or RNN-T [B, T', U + 1, V];
      'logit_paddings': [B, T'] (the encoder's paddings);
      'encoded': [B, T', D] encoder output.
    """
    del label_paddings  # The decoders read padded labels (id 0) harmlessly.
    encoded, paddings = self.encode(audio, audio_paddings, train=train)
    logits = self.decoder_net(encoded, labels)
    return {"logits": logits, "logit_paddings": paddings, "encoded": encoded}

  def run_decoder(self, method_name: str, *args: Any) -> Any:
    """The decoder's method `method_name` on `args`, for decoding via apply().

    E.g. model.apply(variables, 'joint', encoded [B, D], predicted [B, P],
    method=ConformerASR.run_decoder) -> logits [B, V]: one step of greedy
    decoding.
    """
    return getattr(self.decoder_net, method_name)(*args)


def _model_inputs(batch: Batch) -> tuple[Array, Array, Array, Array]:
  return (batch["audio"], batch["audio_paddings"], batch["labels"],
          batch["label_paddings"])


def per_example_loss(model: ConformerASR, variables: Variables, batch: Batch,
                     *, train: bool,
                     rng: PRNGKey | None) -> tuple[Array, dict[str, Any]]:
  """Negative log-likelihood of each utterance's transcript (sum over tokens).

  Args:
    model: A ConformerASR.
    variables: {'params': ..., ['batch_stats': ...]}.
    batch: 'audio', 'audio_paddings', 'labels', 'label_paddings'.
    train: Training mode: dropout and SpecAugment on, batch-norm statistics
      from the batch.
    rng: Split into the 'dropout' and 'specaug' streams; may be None when
      train is False.

  Returns:
    (loss float32 [B], new_model_state): {'batch_stats': ...} updated when
    training a batch-norm model, {} otherwise.
  """
  rngs = {}
  if train:
    if rng is None:
      raise ValueError("per_example_loss: train=True needs an rng.")
    dropout_rng, specaug_rng = jax.random.split(rng)
    rngs = {"dropout": dropout_rng, "specaug": specaug_rng}
  update_stats = train and "batch_stats" in variables
  outputs = model.apply(variables, *_model_inputs(batch), train=train,
                        rngs=rngs,
                        mutable=["batch_stats"] if update_stats else False)
  new_state = {}
  if update_stats:
    outputs, new_state = outputs
    new_state = {"batch_stats": new_state["batch_stats"]}
  loss = model.make_decoder().loss(outputs["logits"],
                                   outputs["logit_paddings"], batch["labels"],
                                   batch["label_paddings"])
  return loss, new_state


def greedy_decode(model: ConformerASR, variables: Variables,
                  batch: Batch) -> tuple[Array, Array]:
  """Greedy transcripts in evaluation mode: the decoder's `decode`.

  CTC: best path, repeats merged, blanks removed, ids [B, T'].
  RNN-T: `decoders.rnnt_greedy_decode`, ids [B, T' * max_symbols_per_step].

  Returns:
    (ids int32 [B, L], paddings float32 [B, L]) left-aligned; 0 = padding.
  """
  encoded, paddings = model.apply(variables, batch["audio"],
                                  batch["audio_paddings"], train=False,
                                  method=ConformerASR.encode)
  run = lambda method_name, *args: model.apply(
      variables, method_name, *args, method=ConformerASR.run_decoder)
  return model.make_decoder().decode(run, encoded, paddings)
