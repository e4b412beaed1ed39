"""Evaluation split over hosts: records gathered and reduced in batch order.

`evaluation.evaluate` gives process p of P the batches p, p+P, ...; the
records of every process are gathered (`multihost.gather_json`) and reduced in
the split's order. Here two processes are simulated by two accumulators and a
stand-in for the exchange: their result must equal one accumulator's over
every batch, bit for bit (losses summed in the same order, the same bootstrap
interval over the same utterances), and the transcripts must come back in the
split's order.
"""

import json

import numpy as np
import pytest

from conformer_fl import evaluation
from conformer_fl import multihost
from conformer_fl import stats

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "fox"]


def _decode(ids):
  return " ".join(WORDS[i - 1] for i in ids)


def _batches(num_batches=5, batch_size=3, length=4, speakers=False):
  """(batch, eval outputs) pairs: random labels and partly wrong hypotheses.

  speakers: give each batch a 'speaker' [B] (indices 0-2, -1 in filler rows).
  """
  rng = np.random.default_rng(7)
  pairs = []
  for _ in range(num_batches):
    labels = rng.integers(1, len(WORDS) + 1, size=(batch_size, length))
    paddings = (np.arange(length)[None] >=
                rng.integers(1, length + 1, size=(batch_size, 1))).astype(
                    np.float32)
    labels = (labels * (1 - paddings)).astype(np.int32)
    ids = np.where(rng.random(labels.shape) < 0.3,
                   rng.integers(1, len(WORDS) + 1, labels.shape), labels)
    mask = np.ones(batch_size, np.float32)
    mask[-1] = float(rng.random() < 0.5)  # Some batches end with padding.
    batch = dict(labels=labels, label_paddings=paddings, example_mask=mask)
    if speakers:
      batch["speaker"] = np.where(mask > 0, rng.integers(0, 3, batch_size),
                                  -1).astype(np.int32)
    outputs = dict(loss_sum=np.float32(rng.random() * 10),
                   num_examples=np.float32(mask.sum()),
                   ids=ids.astype(np.int32), id_paddings=paddings)
    pairs.append((batch, outputs))
  return pairs


@pytest.mark.parametrize("speakers", [False, True])
def test_two_hosts_records_reduce_to_one_hosts_result(monkeypatch, speakers):
  pairs = _batches(speakers=speakers)
  one = evaluation.EvalAccumulator(_decode)
  for batch, outputs in pairs:
    one.add(outputs, batch)
  hosts = [evaluation.EvalAccumulator(_decode) for _ in range(2)]
  for index, (batch, outputs) in enumerate(pairs):
    hosts[index % 2].add(outputs, batch, index)
  # Each host's records travel as JSON, as they do between real processes.
  parts = [json.loads(json.dumps(h._records)) for h in hosts]  # pylint: disable=protected-access
  monkeypatch.setattr(multihost, "gather_json", lambda value, name: parts)
  merged = hosts[1].gathered()
  assert merged.result() == one.result()
  assert merged.examples == one.examples
  # Host 1 alone saw batches 1 and 3 only.
  assert hosts[1].result()["num_examples"] < one.result()["num_examples"]


def test_result_carries_utterances_and_resamples_speakers():
  pairs = _batches(num_batches=8, speakers=True)
  accumulator = evaluation.EvalAccumulator(_decode)
  for batch, outputs in pairs:
    accumulator.add(outputs, batch)
  result = accumulator.result()
  speakers = [int(s) for batch, _ in pairs
              for s, m in zip(batch["speaker"], batch["example_mask"]) if m]
  assert result["utterance_speakers"] == speakers
  errors = np.array(result["utterance_errors"])
  words = np.array(result["utterance_words"])
  assert len(errors) == len(words) == result["num_examples"]
  assert errors.sum() / words.sum() == result["wer"]
  assert result["num_speakers"] == len(set(speakers)) == 3
  interval = stats.rate_interval(errors, words, speakers)
  assert (result["wer_low"], result["wer_high"]) == (interval["low"],
                                                     interval["high"])
  # Without speakers each utterance is a speaker of its own.
  plain = evaluation.EvalAccumulator(_decode)
  for batch, outputs in pairs:
    plain.add(outputs, {k: v for k, v in batch.items() if k != "speaker"})
  alone = plain.result()
  assert alone["utterance_speakers"] == [-(i + 1) for i in range(len(errors))]
  assert alone["utterance_errors"] == result["utterance_errors"]
  assert alone["num_speakers"] == len(errors)
  assert (alone["wer_low"], alone["wer_high"]) != (result["wer_low"],
                                                   result["wer_high"])


def test_evaluate_on_one_process_sees_every_batch():
  pairs = _batches()
  outputs_of = {id(batch): outputs for batch, outputs in pairs}
  metrics, examples = evaluation.evaluate(
      lambda variables, batch: outputs_of[id(batch)], None,
      [batch for batch, _ in pairs], _decode)
  expected = sum(float(o["num_examples"]) for _, o in pairs)
  assert metrics["num_examples"] == expected == len(examples)
  assert metrics["loss"] == pytest.approx(
      sum(float(o["loss_sum"]) for _, o in pairs) / expected)


def test_one_process_exchanges_return_at_once():
  assert multihost.gather_json({"a": 1}, "test") == [{"a": 1}]
  assert multihost.chief_decides(3, "test") == 3
  assert multihost.all_true(False, "test") is False
  assert multihost.is_chief()
