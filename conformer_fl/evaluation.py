"""Evaluation of a Conformer on padded batches: mean loss and WER.

`make_eval_step` gives a pure function of (variables, batch) that jit compiles once
per batch shape and can be vmapped over a leading axis of variable sets (the
analysis pass evaluates many reset variants of a model at once that way).
Transcripts are detokenized and scored on the host with `conformer_fl.wer`.
"""

from collections.abc import Callable, Iterable, Mapping
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conformer_fl import models
from conformer_fl import wer as wer_lib

Batch = Mapping[str, Any]
Variables = Mapping[str, Any]
EvalOutput = dict[str, jax.Array]


def make_eval_step(model: nn.Module) -> Callable[[Variables, Batch], EvalOutput]:
  """Returns `eval_step(variables, batch) -> outputs` (pure; not yet jitted).

  Outputs:
    loss_sum: f32[] loss summed over the real examples of the batch.
    num_examples: f32[] number of real examples (`batch['example_mask']`).
    ids: i32[B, L] greedy hypotheses, 0 at padded positions.
    id_paddings: f32[B, L].
  """

  def eval_step(variables: Variables, batch: Batch) -> EvalOutput:
    mask = batch["example_mask"]
    loss, _ = models.per_example_loss(
        model, variables, batch, train=False, rng=jax.random.key(0)
    )
    ids, id_paddings = models.greedy_decode(model, variables, batch)
    loss = jnp.where(mask > 0, loss, 0.0)
    return dict(
        loss_sum=jnp.sum(loss),
        num_examples=jnp.sum(mask),
        ids=ids,
        id_paddings=id_paddings,
    )

  return eval_step


@functools.lru_cache(maxsize=8)
def jitted_eval_step(model: nn.Module) -> Callable[[Variables, Batch],
                                                   EvalOutput]:
  """`jax.jit(make_eval_step(model))`, one per model (modules hash by fields).

  Every run and evaluation of a process with an equal model shares it, so a
  batch shape compiles once per process (the experiment evaluates 12 runs
  and 2 checkpoints of one model).
  """
  return jax.jit(make_eval_step(model))


def ids_to_texts(
    ids: np.ndarray, paddings: np.ndarray, decode: Callable[[list[int]], str]
) -> list[str]:
  """Detokenizes the valid ids of each row of i32[B, L] with `decode`."""
  return [
      decode([int(t) for t, p in zip(row, pad) if p == 0 and t != 0])
      for row, pad in zip(np.asarray(ids), np.asarray(paddings))
  ]


class EvalAccumulator:
  """Sums loss, word errors and reference words over the batches of a split."""

  def __init__(self, decode: Callable[[list[int]], str]):
    self._decode = decode
    self.loss_sum = 0.0
    self.num_examples = 0.0
    # Per utterance, in order: (errors, reference length) in words and in
    # characters; the corpus rates and the WER interval are computed from them.
    self._words: list[np.ndarray] = []
    self._chars: list[np.ndarray] = []
    self.examples: list[tuple[str, str]] = []

  def add(self, outputs: Mapping[str, Any], batch: Batch) -> None:
    """Adds one batch's `eval_step` outputs (host numpy or device arrays)."""
    outputs = jax.device_get(outputs)
    self.loss_sum += float(outputs["loss_sum"])
    self.num_examples += float(outputs["num_examples"])
    keep = np.asarray(batch["example_mask"]) > 0
    hypotheses = ids_to_texts(outputs["ids"], outputs["id_paddings"], self._decode)
    references = ids_to_texts(batch["labels"], batch["label_paddings"], self._decode)
    hypotheses = [h for h, k in zip(hypotheses, keep) if k]
    references = [r for r, k in zip(references, keep) if k]
    self._words.append(np.stack(
        wer_lib.utterance_errors(references, hypotheses, "word")))    # [2, n]
    self._chars.append(np.stack(
        wer_lib.utterance_errors(references, hypotheses, "char")))    # [2, n]
    self.examples.extend(zip(references, hypotheses))

  def result(self) -> dict[str, float]:
    """Metrics of the batches added so far.

    Returns:
      {'loss': mean loss per example, 'wer': corpus WER, 'cer': corpus CER,
       'wer_low', 'wer_high': 95% bootstrap interval of the WER over the
       utterances (`wer.bootstrap_rate_interval`), 'num_examples': n}.
    """
    if self.num_examples == 0:
      raise ValueError("Evaluation saw no examples: is the eval split empty?")
    word_errors, words = np.concatenate(self._words, axis=1)
    char_errors, chars = np.concatenate(self._chars, axis=1).sum(axis=1)
    low, high = wer_lib.bootstrap_rate_interval(word_errors, words)
    return dict(
        loss=self.loss_sum / self.num_examples,
        wer=int(word_errors.sum()) / max(int(words.sum()), 1),
        cer=int(char_errors) / max(int(chars), 1),
        wer_low=low,
        wer_high=high,
        num_examples=self.num_examples,
    )


def evaluate(
    eval_step: Callable[[Variables, Batch], EvalOutput],
    variables: Variables,
    batches: Iterable[Batch],
    decode: Callable[[list[int]], str],
) -> tuple[dict[str, float], list[tuple[str, str]]]:
  """Evaluates `variables` on every batch.

  Args:
    eval_step: a jitted `make_eval_step(model)`.
    variables: the model's variables.
    batches: padded batches with 'example_mask'.
    decode: token ids -> text (the tokenizer's decode).

  Returns:
    ({'loss', 'wer', 'num_examples'}, [(reference, hypothesis), ...]).
  """
  accumulator = EvalAccumulator(decode)
  for batch in batches:
    accumulator.add(eval_step(variables, batch), batch)
  return accumulator.result(), accumulator.examples
