"""Conformer encoder (Gulati et al., arXiv 2005.08100) in Flax linen.

One file, read top to bottom: norms over valid frames, the depthwise
convolution, the four sub-modules of a block, the block, the 4x convolutional
subsampling and the encoder.

Conventions shared by every module here:
  * `x` is float32 [B, T, D]; `paddings` is float32 [B, T] with 1.0 at padded
    frames and 0.0 at valid frames. Every module takes and returns paddings.
  * `train` is passed explicitly (dropout on, batch-norm statistics from the
    batch and written to the `batch_stats` collection).
  * Padding invariance: appending padded frames to an utterance never changes
    the outputs at its valid frames. To keep it, (1) attention masks padded
    keys, (2) the depthwise convolution and the subsampling convolutions see
    zeros at padded frames, (3) conv-module norm statistics are taken over
    valid frames only, and (4) each block zeroes its output at padded frames.

Hyperparameters: one frozen `ConformerConfig` declares them all; the encoder
hands the same instance to every block (and `models.ConformerASR` holds it as
`encoder_config`), so each is declared once.

The encoder's parameter tree is
  {'subsampling': {...}, 'block_00': {'ffn1', 'mhsa', 'conv', 'ffn2',
   'final_norm'}, 'block_01': ..., ...}
and these names are the layer names used by the analysis and by federated
dropout (see `units.py`); do not rename them.
"""

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

ConvNorm = Literal["batch_norm", "group_norm", "layer_norm"]
DepthwiseImpl = Literal["shift_add", "conv"]

CONV_NORMS = ("batch_norm", "group_norm", "layer_norm")
DEPTHWISE_IMPLS = ("shift_add", "conv")


def _valid_mask(paddings: Array) -> Array:
  """[B, T] paddings -> [B, T, 1] float mask, 1.0 at valid frames."""
  return (1.0 - paddings)[..., None]


# ----------------------------------------------------------------------------
# Norms of the convolution module, statistics over valid frames only.
# ----------------------------------------------------------------------------


class MaskedBatchNorm(nn.Module):
  """Batch norm over [B, T, D] whose statistics ignore padded frames.

  In training the mean and variance of each channel are taken over the valid
  frames of the whole batch and the running averages in the `batch_stats`
  collection ('mean', 'var') are updated; in evaluation the running averages
  are used.

  Attributes:
    momentum: Decay of the running averages (new = m * old + (1 - m) * batch).
    epsilon: Added to the variance before the reciprocal square root.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: Array, paddings: Array, *, train: bool) -> Array:
    """[B, T, D], [B, T] -> [B, T, D]."""
    features = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    if train:
      mask = _valid_mask(paddings)
      count = jnp.maximum(jnp.sum(mask), 1.0)
      mean = jnp.sum(x * mask, axis=(0, 1)) / count
      var = jnp.sum(jnp.square(x - mean) * mask, axis=(0, 1)) / count
      if not self.is_initializing():
        running_mean.value = (self.momentum * running_mean.value +
                              (1.0 - self.momentum) * mean)
        running_var.value = (self.momentum * running_var.value +
                             (1.0 - self.momentum) * var)
    else:
      mean, var = running_mean.value, running_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class MaskedGroupNorm(nn.Module):
  """Group norm over [B, T, D]: per example and group, over valid frames.

  The D channels are split into `num_groups` groups of D / num_groups; the
  mean and variance of a group are taken over its channels and the valid
  frames of one example (no dependence on other examples: suited to
  federated learning).

  Attributes:
    num_groups: Number of channel groups; must divide D.
    epsilon: Added to the variance before the reciprocal square root.
  """
  num_groups: int = 1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array, paddings: Array, *, train: bool) -> Array:
    """[B, T, D], [B, T] -> [B, T, D]. `train` is unused (same both ways)."""
    del train
    batch, time, features = x.shape
    if features % self.num_groups:
      raise ValueError(
          f"group_norm: num_groups={self.num_groups} does not divide the "
          f"channel count {features}.")
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    grouped = x.reshape(batch, time, self.num_groups, -1)  # [B, T, G, D/G]
    mask = (1.0 - paddings)[:, :, None, None]
    count = jnp.maximum(
        jnp.sum(mask, axis=(1, 3), keepdims=True) * grouped.shape[-1], 1.0)
    mean = jnp.sum(grouped * mask, axis=(1, 3), keepdims=True) / count
    var = jnp.sum(jnp.square(grouped - mean) * mask, axis=(1, 3),
                  keepdims=True) / count
    normed = (grouped - mean) * jax.lax.rsqrt(var + self.epsilon)
    return normed.reshape(batch, time, features) * scale + bias


class FrameLayerNorm(nn.Module):
  """Layer norm over channels, with the (paddings, train) signature of norms."""
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, paddings: Array, *, train: bool) -> Array:
    """[B, T, D], [B, T] -> [B, T, D]."""
    del paddings, train
    return nn.LayerNorm(epsilon=self.epsilon, name="layer_norm")(x)


# ----------------------------------------------------------------------------
# Depthwise convolution over time.
# ----------------------------------------------------------------------------


class DepthwiseConv1D(nn.Module):
  """Non-causal depthwise 1-D convolution over time, no bias.

  The kernel has nn.Conv's depthwise shape [K, 1, D] (in_features / groups =
  1), so both implementations read the same parameters:
    * 'shift_add': sum over the K taps of the zero-padded input shifted by the
      tap, times that tap's per-channel weight. Elementwise work only: fast on
      XLA:CPU, also under vmap over parameter sets
      (benchmarks/model_step.py measures it).
    * 'conv': lax.conv_general_dilated with feature_group_count = D, what
      nn.Conv(feature_group_count=D) runs. Slow on XLA:CPU; kept to compare.
  Padding is 'SAME': (K - 1) // 2 zeros before and K // 2 after, as nn.Conv.
  Padded frames must already be zero in `x` (the conv module does this).

  Attributes:
    kernel_size: K, the number of taps.
    impl: 'shift_add' or 'conv'.
  """
  kernel_size: int
  impl: DepthwiseImpl = "shift_add"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, T, D] -> [B, T, D]."""
    if self.impl not in DEPTHWISE_IMPLS:
      raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, "
                       f"got {self.impl!r}.")
    features = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel_size, 1, features))
    pad_before = (self.kernel_size - 1) // 2
    pad_after = self.kernel_size // 2
    if self.impl == "conv":
      return jax.lax.conv_general_dilated(
          x, kernel, window_strides=(1,), padding=[(pad_before, pad_after)],
          dimension_numbers=("NWC", "WIO", "NWC"),
          feature_group_count=features)
    time = x.shape[1]
    padded = jnp.pad(x, ((0, 0), (pad_before, pad_after), (0, 0)))
    out = padded[:, 0:time, :] * kernel[0, 0]
    for tap in range(1, self.kernel_size):  # K is static and small.
      out = out + padded[:, tap:tap + time, :] * kernel[tap, 0]
    return out


# ----------------------------------------------------------------------------
# The four sub-modules of a Conformer block.
# ----------------------------------------------------------------------------


class FeedForwardModule(nn.Module):
  """Pre-norm FFN: LN, Dense(ffn_mult*D), swish, dropout, Dense(D), dropout.

  Returns the residual branch only; the block adds 0.5 times it.

  Attributes:
    model_dim: D.
    ffn_mult: Hidden width multiplier (4 in the paper).
    dropout_rate: Dropout after the activation and after the output.
    hidden_units: F, the hidden width; None = ffn_mult * D (a Federated
      Dropout sub-model keeps fewer).
    kept_scale: multiplies the hidden units before dense_out (inverted
      dropout of a sub-model: full / kept width); 1 = none.
  """
  model_dim: int
  ffn_mult: int = 4
  dropout_rate: float = 0.1
  hidden_units: int | None = None
  kept_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array, paddings: Array, *,
               train: bool) -> tuple[Array, Array]:
    """[B, T, D], [B, T] -> ([B, T, D], [B, T])."""
    hidden = self.hidden_units or self.ffn_mult * self.model_dim
    y = nn.LayerNorm(name="norm")(x)
    y = nn.Dense(hidden, name="dense_in")(y)
    y = nn.swish(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    if self.kept_scale != 1.0:
      y = y * self.kept_scale
    y = nn.Dense(self.model_dim, name="dense_out")(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    return y, paddings


def relative_sinusoids(max_distance: int, dim: int) -> Array:
  """Sinusoidal embeddings of relative distances -max_distance..max_distance.

  Row r embeds the distance r - max_distance (query index minus key index).

  Returns:
    float32 [2 * max_distance + 1, dim]: [sin(d * f_i), cos(d * f_i)] halves
    with f_i = 10000^(-2i / dim).
  """
  distances = jnp.arange(-max_distance, max_distance + 1, dtype=jnp.float32)
  inv_freq = 1.0 / (10000.0**(jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = distances[:, None] * inv_freq[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)[:, :dim]


class RelativeSelfAttention(nn.Module):
  """Pre-norm multi-head self-attention with Transformer-XL relative positions.

  The score of query i and key j in head h (Dai et al. 2019, as in the
  Conformer paper) is
    ((q_i + u_h) . k_j + (q_i + v_h) . W_r p(i - j)) / sqrt(D / H)
  with p(.) a fixed sinusoidal embedding of the distance i - j, W_r a learned
  projection ('pos_proj', no bias) and u, v learned per-head biases
  ('content_bias', 'position_bias'). Padded keys get a large negative score
  before the softmax. Scores depend on i - j only, never on T, so appending
  padded frames changes nothing at valid frames.

  Attributes:
    model_dim: D.
    num_heads: H; must divide D. Heads have width Dh = D / H.
    attention_dropout_rate: Dropout on the attention probabilities.
    dropout_rate: Dropout on the module's output.
    kept_heads: the heads computed, of width Dh; None = H (a Federated
      Dropout sub-model keeps fewer).
    kept_scale: multiplies the heads' outputs before the output projection
      (inverted dropout of a sub-model: H / kept heads); 1 = none.
  """
  model_dim: int
  num_heads: int
  attention_dropout_rate: float = 0.0
  dropout_rate: float = 0.1
  kept_heads: int | None = None
  kept_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array, paddings: Array, *,
               train: bool) -> tuple[Array, Array]:
    """[B, T, D], [B, T] -> ([B, T, D], [B, T])."""
    if self.model_dim % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide "
                       f"model_dim={self.model_dim}.")
    head_dim = self.model_dim // self.num_heads
    num_heads = self.kept_heads or self.num_heads
    time = x.shape[1]
    dense = lambda name, bias=True: nn.DenseGeneral(
        (num_heads, head_dim), use_bias=bias, name=name)

    y = nn.LayerNorm(name="norm")(x)
    query, key, value = dense("query")(y), dense("key")(y), dense("value")(y)
    content_bias = self.param("content_bias", nn.initializers.zeros,
                              (num_heads, head_dim))
    position_bias = self.param("position_bias", nn.initializers.zeros,
                               (num_heads, head_dim))
    # [2T-1, H, Dh]: projected embeddings of distances -(T-1)..(T-1).
    positions = dense("pos_proj", bias=False)(
        relative_sinusoids(time - 1, self.model_dim))

    content_scores = jnp.einsum("bqhd,bkhd->bhqk", query + content_bias, key)
    scores_by_distance = jnp.einsum("bqhd,rhd->bhqr", query + position_bias,
                                    positions)  # [B, H, T, 2T-1]
    # Entry (i, j) reads the column of distance i - j, i.e. i - j + T - 1.
    distance_index = (jnp.arange(time)[:, None] - jnp.arange(time)[None, :] +
                      time - 1)
    position_scores = jnp.take_along_axis(
        scores_by_distance,
        jnp.broadcast_to(distance_index, scores_by_distance.shape[:2] +
                         (time, time)),
        axis=-1)
    scores = (content_scores + position_scores) / math.sqrt(head_dim)
    scores = jnp.where(paddings[:, None, None, :] > 0.5, -1e9, scores)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(self.attention_dropout_rate)(
        probs, deterministic=not train)
    attended = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    if self.kept_scale != 1.0:
      attended = attended * self.kept_scale
    y = nn.DenseGeneral(self.model_dim, axis=(-2, -1), name="output")(attended)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    return y, paddings


class ConvolutionModule(nn.Module):
  """LN, pointwise conv + GLU, depthwise conv, norm, swish, pointwise, dropout.

  The inner channel count C (after the GLU, through the depthwise conv and
  the norm) is D, or `channels` (a Federated Dropout sub-model keeps fewer).

  Attributes:
    model_dim: D.
    kernel_size: Depthwise kernel size K (32 in the paper).
    norm: 'batch_norm' | 'group_norm' | 'layer_norm' after the depthwise conv.
    norm_groups: Number of groups of 'group_norm'.
    batch_norm_momentum: Running-average momentum of 'batch_norm'.
    depthwise_impl: 'shift_add' | 'conv' (see DepthwiseConv1D).
    dropout_rate: Dropout on the module's output.
    channels: C; None = D.
    kept_scale: multiplies the channels before pointwise_out (inverted
      dropout of a sub-model: D / kept channels); 1 = none.
  """
  model_dim: int
  kernel_size: int = 32
  norm: ConvNorm = "batch_norm"
  norm_groups: int = 1
  batch_norm_momentum: float = 0.99
  depthwise_impl: DepthwiseImpl = "shift_add"
  dropout_rate: float = 0.1
  channels: int | None = None
  kept_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array, paddings: Array, *,
               train: bool) -> tuple[Array, Array]:
    """[B, T, D], [B, T] -> ([B, T, D], [B, T])."""
    channels = self.channels or self.model_dim
    y = nn.LayerNorm(name="norm")(x)
    y = nn.Dense(2 * channels, name="pointwise_in")(y)
    y = nn.glu(y, axis=-1)
    y = y * _valid_mask(paddings)  # Padded frames must not reach valid ones.
    y = DepthwiseConv1D(self.kernel_size, self.depthwise_impl,
                        name="depthwise")(y)
    if self.norm == "batch_norm":
      norm = MaskedBatchNorm(momentum=self.batch_norm_momentum,
                             name="conv_norm")
    elif self.norm == "group_norm":
      norm = MaskedGroupNorm(num_groups=self.norm_groups, name="conv_norm")
    elif self.norm == "layer_norm":
      norm = FrameLayerNorm(name="conv_norm")
    else:
      raise ValueError(f"conv_norm must be one of {CONV_NORMS}, "
                       f"got {self.norm!r}.")
    y = norm(y, paddings, train=train)
    y = nn.swish(y)
    if self.kept_scale != 1.0:
      y = y * self.kept_scale
    y = nn.Dense(self.model_dim, name="pointwise_out")(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    return y, paddings


# ----------------------------------------------------------------------------
# Block, subsampling, encoder.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConformerConfig:
  """The Conformer encoder's hyperparameters, each declared here only.

  `ConformerEncoder` and each of its `ConformerBlock`s hold one instance as
  `config`; the flat model config (conformer_fl/models/sizes.py) has one field
  per attribute here, plus those of the front end and decoder
  (`models.ConformerASR`). Frozen (and of hashable values), so that the
  modules holding it stay hashable. The defaults are the tiny model's widths.

  Attributes:
    num_blocks: Number of Conformer blocks.
    model_dim: D, width of the encoder.
    num_heads: Attention heads H (head width D / H).
    ffn_mult: Feed-forward hidden width multiplier (hidden width ffn_mult*D).
    conv_kernel_size: Depthwise kernel size K.
    conv_norm: 'batch_norm' | 'group_norm' | 'layer_norm' in the conv module.
    conv_norm_groups: Groups of 'group_norm'.
    batch_norm_momentum: Running-average momentum of 'batch_norm'.
    depthwise_impl: 'shift_add' (fast on CPU) | 'conv' (feature_group_count).
    dropout_rate: Residual-branch dropout (and subsampling output dropout).
    attention_dropout_rate: Dropout on attention probabilities.
    kept_units: a Federated Dropout sub-model's widths: ((module, kept
      units), ...) with module a droppable module below the encoder
      ('block_03/ffn1', 'block_03/conv', 'block_03/mhsa') and the units it
      keeps (hidden units, inner channels, heads); () = the full model. Not a
      field of the flat model config, which describes the full model:
      `models.build_model(config, kept_units)` sets it.
    rescale_kept: inverted dropout for a sub-model: each module that keeps
      k of its n units (hidden units, channels, heads) multiplies what they
      feed its output projection by n / k, so that the projection's input
      matches the full module's in expectation; False = as they are. Set with kept_units by
      `models.build_model(config, kept_units, rescale_kept)`.
  """
  num_blocks: int = 2
  model_dim: int = 32
  num_heads: int = 2
  ffn_mult: int = 4
  conv_kernel_size: int = 32
  conv_norm: ConvNorm = "batch_norm"
  conv_norm_groups: int = 1
  batch_norm_momentum: float = 0.99
  depthwise_impl: DepthwiseImpl = "shift_add"
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  kept_units: tuple[tuple[str, int], ...] = ()
  rescale_kept: bool = False


class ConformerBlock(nn.Module):
  """x + FFN/2, + MHSA, + Conv, + FFN/2, LayerNorm; zero at padded frames.

  Sub-module names ('ffn1', 'mhsa', 'conv', 'ffn2', 'final_norm') are unit
  names (see units.py).

  Attributes:
    config: the encoder's hyperparameters (num_blocks is not read here).
  """
  config: ConformerConfig

  @nn.compact
  def __call__(self, x: Array, paddings: Array, *,
               train: bool) -> tuple[Array, Array]:
    """[B, T, D], [B, T] -> ([B, T, D], [B, T])."""
    c = self.config
    kept = dict(c.kept_units)
    width = lambda module: kept.get(f"{self.name}/{module}")
    full_width = dict(ffn1=c.ffn_mult * c.model_dim, mhsa=c.num_heads,
                      conv=c.model_dim, ffn2=c.ffn_mult * c.model_dim)

    def scale(module: str) -> float:
      """n / k of a module that keeps k of n units under rescale_kept."""
      k = width(module)
      return full_width[module] / k if c.rescale_kept and k else 1.0

    ffn = lambda name: FeedForwardModule(c.model_dim, c.ffn_mult,
                                         c.dropout_rate, width(name),
                                         scale(name), name=name)
    y, _ = ffn("ffn1")(x, paddings, train=train)
    x = x + 0.5 * y
    y, _ = RelativeSelfAttention(
        c.model_dim, c.num_heads, c.attention_dropout_rate,
        c.dropout_rate, width("mhsa"), scale("mhsa"), name="mhsa")(
            x, paddings, train=train)
    x = x + y
    y, _ = ConvolutionModule(
        c.model_dim, c.conv_kernel_size, c.conv_norm, c.conv_norm_groups,
        c.batch_norm_momentum, c.depthwise_impl, c.dropout_rate,
        width("conv"), scale("conv"), name="conv")(x, paddings, train=train)
    x = x + y
    y, _ = ffn("ffn2")(x, paddings, train=train)
    x = x + 0.5 * y
    x = nn.LayerNorm(name="final_norm")(x)
    return x * _valid_mask(paddings), paddings


class StridedConv3x3(nn.Module):
  """A 3x3 stride-2 convolution with one zero of padding on each side.

  Computed as one matmul over the 9 shifted, strided views of the input (an
  explicit im2col) instead of `lax.conv`: under `vmap` over per-client kernels
  a convolution becomes a grouped convolution (`feature_group_count` = clients),
  which XLA:CPU runs several times slower, while a matmul becomes a batched
  matmul. Parameters are those of `nn.Conv(features, (3, 3))`: 'kernel'
  [3, 3, C_in, C_out] (LeCun normal) and 'bias' [C_out], so checkpoints of
  either form load in the other.

  Attributes:
    features: C_out.
  """
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, T, F, C_in] -> [B, ceil(T / 2), ceil(F / 2), C_out]."""
    _, time, freq, channels = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    out_time, out_freq = -(-time // 2), -(-freq // 2)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([
        padded[:, i:i + 2 * out_time - 1:2, j:j + 2 * out_freq - 1:2, :]
        for i in range(3) for j in range(3)], axis=-1)  # [B, T', F', 9 C_in]
    return patches @ kernel.reshape(9 * channels, self.features) + bias


class ConvSubsampling(nn.Module):
  """4x time subsampling: two 3x3 stride-2 convs (relu), flatten, Dense to D.

  Both convs pad one zero on each side of the time and frequency axes, so
  output frame t reads input frames 2t-1, 2t, 2t+1 whatever the length of the
  array: an output frame is valid iff input frame 2t is valid, i.e. the
  output paddings are paddings[:, ::2] per conv, paddings[:, ::4] overall
  (T' = ceil(ceil(T / 2) / 2)). Inputs at padded frames are zeroed before each
  conv; then a valid frame sees exactly what it would see in the unpadded
  array (the zero the conv pads with), which gives padding invariance.
  The frequency axis goes F -> ceil(F/2) -> ceil(F/4) (80 -> 40 -> 20).

  Attributes:
    model_dim: D, also the channel count of both convs.
    dropout_rate: Dropout on the output.
  """
  model_dim: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, features: Array, paddings: Array, *,
               train: bool) -> tuple[Array, Array]:
    """[B, T, F], [B, T] -> ([B, T', D], [B, T']) with T' = ceil(T / 4)."""
    x = features[..., None] * _valid_mask(paddings)[..., None]  # [B,T,F,1]
    for name in ("conv_0", "conv_1"):
      x = StridedConv3x3(self.model_dim, name=name)(x)
      paddings = paddings[:, ::2]
      x = nn.relu(x) * _valid_mask(paddings)[..., None]
    batch, time = x.shape[:2]
    x = x.reshape(batch, time, -1)  # [B, T', F' * D]
    x = nn.Dense(self.model_dim, name="projection")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return x * _valid_mask(paddings), paddings


class ConformerEncoder(nn.Module):
  """ConvSubsampling, then `num_blocks` ConformerBlocks block_00, block_01...

  The blocks are unrolled by a Python loop at trace time (compile-time cost
  only): each block keeps its own named parameter subtree, which the layer
  analysis and federated dropout address by name.

  Attributes:
    config: the encoder's hyperparameters (`ConformerConfig`), handed to
      every block as is.
  """
  config: ConformerConfig

  @nn.compact
  def __call__(self, features: Array, paddings: Array, *,
               train: bool) -> tuple[Array, Array]:
    """[B, T, F], [B, T] -> ([B, T', D], [B, T']) with T' = ceil(T / 4)."""
    x, paddings = ConvSubsampling(self.config.model_dim,
                                  self.config.dropout_rate,
                                  name="subsampling")(
                                      features, paddings, train=train)
    for index in range(self.config.num_blocks):
      x, paddings = ConformerBlock(self.config, name=f"block_{index:02d}")(
          x, paddings, train=train)
    return x, paddings
