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
from conformer_fl import multihost
from conformer_fl import stats
from conformer_fl import wer as wer_lib

Batch = Mapping[str, Any]
Variables = Mapping[str, Any]
EvalOutput = dict[str, jax.Array]


def make_eval_step(model: nn.Module) -> Callable[[Variables, Batch], EvalOutput]:
  """Returns `eval_step(variables, batch) -> outputs` (pure; not yet jitted).

  Outputs:
    loss_sum: float32 [] loss summed over the real examples of the batch.
    num_examples: float32 [] number of real examples (`batch['example_mask']`).
    ids: int32 [B, L] greedy hypotheses, 0 at padded positions.
    id_paddings: float32 [B, L].
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
  """Detokenizes the valid ids of each row of int32 [B, L] with `decode`."""
  return [
      decode([int(t) for t, p in zip(row, pad) if p == 0 and t != 0])
      for row, pad in zip(np.asarray(ids), np.asarray(paddings))
  ]


class EvalAccumulator:
  """Loss, word and character errors of the batches of a split, per batch.

  Each batch added is kept as one record (its index in the split, loss sum,
  number of examples, per-utterance error counts and speakers, transcripts),
  so that the
  records of batches evaluated on different processes can be gathered
  (`gathered`) and reduced in the split's order: the result is then the same,
  bit for bit, as one process's over every batch.
  """

  def __init__(self, decode: Callable[[list[int]], str]):
    self._decode = decode
    self._records: list[dict[str, Any]] = []

  def add(self, outputs: Mapping[str, Any], batch: Batch,
          index: int | None = None) -> None:
    """Adds one batch's `eval_step` outputs (host numpy or device arrays).

    Args:
      outputs: `eval_step(variables, batch)`.
      batch: the batch (its labels are the references; its 'speaker' [B],
        when present, the speaker of each row).
      index: the batch's position in the split (None = after the last added).
    """
    outputs = jax.device_get(outputs)
    keep = np.asarray(batch["example_mask"]) > 0
    speakers = ([int(x) for x, k in zip(np.asarray(batch["speaker"]), keep) if k]
                if "speaker" in batch else None)
    hypotheses = ids_to_texts(outputs["ids"], outputs["id_paddings"], self._decode)
    references = ids_to_texts(batch["labels"], batch["label_paddings"], self._decode)
    hypotheses = [h for h, k in zip(hypotheses, keep) if k]
    references = [r for r, k in zip(references, keep) if k]
    # Per utterance, in order: (errors, reference length) in words and in
    # characters, [2, N] for the batch's N real examples; the corpus rates and
    # the WER interval are computed from them.
    words = wer_lib.utterance_errors(references, hypotheses, "word")
    chars = wer_lib.utterance_errors(references, hypotheses, "char")
    self._records.append(dict(
        index=len(self._records) if index is None else int(index),
        loss_sum=float(outputs["loss_sum"]),
        num_examples=float(outputs["num_examples"]),
        words=[[int(x) for x in row] for row in words],  # [2, N]
        chars=[[int(x) for x in row] for row in chars],  # [2, N]
        speakers=speakers,  # [N] or None
        examples=[[r, h] for r, h in zip(references, hypotheses)]))

  def gathered(self, name: str = "eval") -> "EvalAccumulator":
    """The records of every process, in batch order (a host-side exchange,
    `multihost.gather_json`: every process must call it)."""
    merged = EvalAccumulator(self._decode)
    parts = multihost.gather_json(self._records, name)
    merged._records = sorted((r for part in parts for r in part),  # pylint: disable=protected-access
                             key=lambda r: r["index"])
    return merged

  @property
  def examples(self) -> list[tuple[str, str]]:
    """(reference, hypothesis) of every real example, in batch order."""
    return [(r, h) for record in self._records for r, h in record["examples"]]

  def utterance_speakers(self) -> list[int]:
    """The speaker index of every real example, in batch order.

    From the batches' 'speaker'; an utterance of a batch without it is a
    speaker of its own, numbered -1, -2, ... by its position (so no two such
    utterances share a speaker).
    """
    speakers = []
    for record in self._records:
      count = len(record["examples"])
      if record.get("speakers") is None:
        first = len(speakers)
        speakers.extend(-(first + i + 1) for i in range(count))
      else:
        speakers.extend(record["speakers"])
    return speakers

  def result(self) -> dict[str, Any]:
    """Metrics of the batches added so far.

    Returns:
      {'loss': mean loss per example, 'wer': corpus WER, 'cer': corpus CER,
       'wer_low', 'wer_high': 95% interval of the WER resampling speakers,
       then utterances within them (`stats.rate_interval`), 'num_examples':
       N, 'num_speakers', and per utterance in batch order, to pool
       evaluations later: 'utterance_errors' [N] word errors,
       'utterance_words' [N] reference words, 'utterance_speakers' [N]
       speaker indices (`utterance_speakers`)}.
    """
    loss_sum, num_examples = 0.0, 0.0
    for record in self._records:  # Summed in batch order, as they were added.
      loss_sum += record["loss_sum"]
      num_examples += record["num_examples"]
    if num_examples == 0:
      raise ValueError("Evaluation saw no examples: is the eval split empty?")
    word_errors, words = np.concatenate(
        [np.array(r["words"], np.int64).reshape(2, -1) for r in self._records],
        axis=1)
    char_errors, chars = np.concatenate(
        [np.array(r["chars"], np.int64).reshape(2, -1) for r in self._records],
        axis=1).sum(axis=1)
    speakers = self.utterance_speakers()
    interval = stats.rate_interval(word_errors, words, speakers)
    return dict(
        loss=loss_sum / num_examples,
        wer=int(word_errors.sum()) / max(int(words.sum()), 1),
        cer=int(char_errors) / max(int(chars), 1),
        wer_low=interval["low"],
        wer_high=interval["high"],
        num_examples=num_examples,
        num_speakers=interval["num_speakers"],
        utterance_errors=[int(x) for x in word_errors],
        utterance_words=[int(x) for x in words],
        utterance_speakers=speakers,
    )


def evaluate(
    eval_step: Callable[[Variables, Batch], EvalOutput],
    variables: Variables,
    batches: Iterable[Batch],
    decode: Callable[[list[int]], str],
) -> tuple[dict[str, float], list[tuple[str, str]]]:
  """Evaluates `variables` on every batch, the batches shared over processes.

  Process p of P evaluates the batches p, p + P, p + 2P, ... of the split;
  their counts and transcripts are then gathered once (host-side,
  `EvalAccumulator.gathered`) and reduced in batch order, so every process
  returns the same result as one process over every batch. Every process
  must call it, with the same batches.

  Args:
    eval_step: a jitted `make_eval_step(model)`.
    variables: the model's variables (host arrays, or this process's copy).
    batches: padded batches with 'example_mask'.
    decode: token ids -> text (the tokenizer's decode).

  Returns:
    (`EvalAccumulator.result`: {'loss', 'wer', 'cer', 'wer_low', 'wer_high',
     'num_examples', 'num_speakers', 'utterance_errors', 'utterance_words',
     'utterance_speakers'}, [(reference, hypothesis), ...] in the split's
     order).
  """
  accumulator = EvalAccumulator(decode)
  num_processes, process = jax.process_count(), jax.process_index()
  for index, batch in enumerate(batches):
    if index % num_processes == process:
      accumulator.add(eval_step(variables, batch), batch, index)
  accumulator = accumulator.gathered("evaluate")
  return accumulator.result(), accumulator.examples
