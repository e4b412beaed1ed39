"""Conformer ASR and federated learning in JAX/Flax.

Shapes: docstrings and comments write an array as its dtype where it matters,
a space, then its dimensions in brackets: `float32 [B, T, D]`, `int16 [N]`,
`[C, K, B, ...]`, and `int32 []` for a scalar. The letters of the whole
package:
  B  examples of a batch (a client's batch in a federated round)
  S  audio samples of a batch's waveforms (N: the samples of one utterance)
  T  log-mel frames; T' the encoder's frames after the 4x subsampling
  F  mel bins
  D  model width
  U  labels of an utterance; L ids of a decoded hypothesis
  V  vocabulary (the model's output classes, blank included)
  C  clients of a round
  K  local steps of a client
A module that needs other dimensions names them in its own docstring (e.g.
M pre-trained models, S seeds and N utterances in conformer_fl/stats.py); a
size that an argument or field gives may be written by its name
(`int32 [num_kept]`).
"""
