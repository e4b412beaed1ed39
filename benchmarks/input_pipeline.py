"""Host input-pipeline throughput: central batches and federated round arrays.

Measures, on one corpus, the host-side cost (numpy + tf.data, no device work) of
  1. reading and preparing the train split (TFDS -> common examples -> validated,
     tokenized examples),
  2. central training batches (`get_train_batches`, in-memory cache, no prefetch
     thread, so the number is the producer's own speed),
  3. eval batches streamed from TFDS (`get_eval_batches`),
  4. federated round arrays [C, K, B, S] (`federated.make_round_data` of the
     sampled clients: their records read from disk by record index,
     `record_source`),
  5. the compiled federated round of a model (`--round_model`, default tiny)
     on those same round arrays, in the same process,
and prints a table, then the ratio of the two round times: the host is not
the bottleneck while building a round's arrays takes well under the compiled
round (ratio < 1; with the prefetch of one round ahead it then hides
entirely). The round arrays use the largest bucket (`--fixed_shape`, as
`federated.fixed_round_shape`), so the compiled round is timed without
recompilation.

Usage:
  python -m benchmarks.input_pipeline --data_dir=/tmp/cfl_data --config=tiny
  python -m benchmarks.input_pipeline --data_dir=/tmp/cfl_data --config=demo \
      --batch_size=16 --clients_per_round=8 --local_steps=4 --client_batch_size=8
  python -m benchmarks.input_pipeline --dataset=librispeech \
      --data_dir=/tmp/cfl_ls_stand_in --client_domains= \
      --bucket_seconds=6,12,18,36 --num_batches=20
(the last on `conformer_fl.data.librispeech_stand_in`, which
benchmarks/client_data_memory.py builds.)
"""

import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from conformer_fl import cli
from conformer_fl.data import batching
from conformer_fl.data import federated
from conformer_fl.data import input_pipeline

_DATASET = flags.DEFINE_string("dataset", "synthetic_speech",
                               "'synthetic_speech', 'librispeech' or a TFDS name.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir.")
_CONFIG = flags.DEFINE_string("config", "tiny", "Builder config (synthetic_speech).")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "char", ["char", "sentencepiece"],
                               "Tokenizer kind (sentencepiece trained in memory).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 128, "SentencePiece vocab size.")
_BUCKET_SECONDS = flags.DEFINE_list("bucket_seconds", ["2", "4", "8", "16"],
                                    "Bucket durations in seconds.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Central batch size.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 200, "Central batches to time.")
_CLIENTS_PER_ROUND = flags.DEFINE_integer("clients_per_round", 4, "C.")
_LOCAL_STEPS = flags.DEFINE_integer("local_steps", 4, "K.")
_CLIENT_BATCH_SIZE = flags.DEFINE_integer("client_batch_size", 4, "B of clients.")
_NUM_ROUNDS = flags.DEFINE_integer("num_rounds", 30, "Rounds to time.")
_CLIENT_DOMAINS = flags.DEFINE_list(
    "client_domains", ["short"], "Domains of the clients' data (empty: all).")
_FIXED_SHAPE = flags.DEFINE_bool(
    "fixed_shape", True, "Round arrays of the largest bucket (one compilation).")
_ROUND_MODEL = flags.DEFINE_string(
    "round_model", "tiny", "Model size of the compiled round to compare with"
    " ('' = no compiled round).")
_TIMED_ROUNDS = flags.DEFINE_integer(
    "timed_rounds", 3, "Compiled rounds to time (after one to compile).")


def _data_config():
  config = input_pipeline.default_data_config()
  config.dataset = _DATASET.value
  config.builder_config = _CONFIG.value if _DATASET.value != "librispeech" else ""
  config.data_dir = _DATA_DIR.value
  config.bucket_seconds = tuple(float(s) for s in _BUCKET_SECONDS.value)
  config.batch_size = _BATCH_SIZE.value
  config.eval_batch_size = _BATCH_SIZE.value
  config.train_domains = ()
  config.client_domains = tuple(d for d in _CLIENT_DOMAINS.value if d)
  config.prefetch_batches = 0
  config.tokenizer.kind = _TOKENIZER.value
  config.tokenizer.vocab_size = _VOCAB_SIZE.value
  return config


def _megabytes(arrays):
  """MB of a pytree of numpy arrays (a batch dict, a RoundData)."""
  return sum(a.nbytes for a in jax.tree.leaves(arrays)) / 1e6


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _data_config()
  rows = []

  start = time.perf_counter()
  tokenizer = input_pipeline.get_tokenizer(config, save_dir=None)
  rows.append(("tokenizer (train transcripts)", 1, time.perf_counter() - start,
               f"{config.tokenizer.kind}, vocab {tokenizer.vocab_size}"))

  rate = input_pipeline.max_labels_per_second(
      input_pipeline.load_split_from_config(config, config.train_split), tokenizer)
  buckets = input_pipeline.buckets_from_config(config)
  skips = batching.SkipCounter("benchmark")
  start = time.perf_counter()
  examples = batching.prepare_examples(
      input_pipeline.load_split_from_config(config, config.train_split),
      tokenizer, buckets, skips)
  prepared = [next(examples)]
  first_seconds = time.perf_counter() - start
  start = time.perf_counter()
  prepared.extend(examples)
  seconds = time.perf_counter() - start
  hours = sum(e["duration"] for e in prepared) / 3600
  rows.append(("open TFDS split, first example", 1, first_seconds, "latency"))
  rows.append(("read + prepare train examples", len(prepared) - 1, seconds,
               f"{hours:.3f} h audio, skipped {dict(skips.counts)}"))

  train_iter = input_pipeline.get_train_batches(config, tokenizer, seed=0)
  next(train_iter)  # the in-memory cache is filled by the first call
  start = time.perf_counter()
  sizes = []
  for _ in range(_NUM_BATCHES.value):
    batch = next(train_iter)
    sizes.append(_megabytes(batch))
  seconds = time.perf_counter() - start
  rows.append((f"train batches [B={config.batch_size}, S<=bucket]",
               _NUM_BATCHES.value, seconds, f"{np.mean(sizes):.2f} MB/batch"))

  start = time.perf_counter()
  num_eval, eval_mb = 0, 0.0
  for batch in input_pipeline.get_eval_batches(config, tokenizer):
    num_eval += 1
    eval_mb += _megabytes(batch)
  seconds = time.perf_counter() - start
  rows.append((f"eval batches ({config.eval_split}, from TFDS)", num_eval, seconds,
               f"{eval_mb / max(num_eval, 1):.2f} MB/batch"))

  datasets = federated.get_client_datasets(config, tokenizer)
  sampler = federated.ClientSampler(
      datasets.client_ids,
      min(_CLIENTS_PER_ROUND.value, len(datasets.client_ids)), seed=0)
  reads_before = datasets.source.records_read
  start = time.perf_counter()
  round_mb = []
  shapes = set()
  kept_rounds = []
  for round_index in range(_NUM_ROUNDS.value):
    ids = sampler.sample(round_index)
    data = federated.make_round_data(
        [datasets.client(c) for c in ids], ids, round_index, 0,
        local_steps=_LOCAL_STEPS.value, batch_size=_CLIENT_BATCH_SIZE.value,
        buckets=datasets.buckets, fixed_shape=_FIXED_SHAPE.value)
    round_mb.append(_megabytes(data))
    shapes.add(data.batches["audio"].shape)
    if len(kept_rounds) <= _TIMED_ROUNDS.value:
      kept_rounds.append(data)
  round_data_seconds = time.perf_counter() - start
  records_per_round = (
      datasets.source.records_read - reads_before) / _NUM_ROUNDS.value
  c, k, b = (sampler.clients_per_round, _LOCAL_STEPS.value,
             _CLIENT_BATCH_SIZE.value)
  rows.append((f"round arrays [C={c}, K={k}, B={b}, S]", _NUM_ROUNDS.value,
               round_data_seconds,
               f"{np.mean(round_mb):.1f} MB/round, S in"
               f" {sorted({s[-1] for s in shapes})}, {records_per_round:.1f}"
               " records read per round"))
  compiled = None
  if _ROUND_MODEL.value:
    compiled = _time_compiled_round(config, tokenizer, kept_rounds)
    rows.append((f"compiled round, model {_ROUND_MODEL.value}"
                 f" ({compiled['devices']} devices)", compiled["rounds"],
                 compiled["seconds"],
                 f"compiled in {compiled['compile_seconds']:.1f} s"))

  print(f"\nInput pipeline on {config.dataset}/{config.builder_config}"
        f" ({config.data_dir or 'TFDS default dir'}), buckets"
        f" {buckets.audio_lengths} samples / {buckets.label_lengths} labels,"
        f" {len(datasets.client_ids)} clients (domains"
        f" {config.client_domains or 'all'}); train split: at most"
        f" {rate:.1f} tokens per second of speech (labels_per_second ="
        f" {config.labels_per_second})\n")
  print("| stage | items | seconds | items/s | ms/item | notes |")
  print("|---|---:|---:|---:|---:|---|")
  for name, items, seconds, notes in rows:
    print(f"| {name} | {items} | {seconds:.2f} | {items / seconds:.1f} |"
          f" {1000 * seconds / max(items, 1):.2f} | {notes} |")
  if compiled is not None:
    data_ms = 1000 * round_data_seconds / _NUM_ROUNDS.value
    round_ms = 1000 * compiled["seconds"] / compiled["rounds"]
    print(f"\nround data / compiled round: {data_ms:.1f} ms / {round_ms:.1f} ms"
          f" = {data_ms / round_ms:.3f} (rounds of arrays per second:"
          f" {1000 / data_ms:.1f}; compiled rounds per second:"
          f" {1000 / round_ms:.2f})")


def _time_compiled_round(data_config, tokenizer, rounds):
  """Seconds of the compiled federated round on `rounds` (the first compiles).

  The round of configs/federated.py (`steps.make_round_from_config`) for a
  model of size --round_model, on a `clients` mesh of every local device
  (that C divides).

  Returns:
    {'rounds', 'seconds' (of the timed rounds, all of rounds[1:]),
     'compile_seconds', 'devices'}.
  """
  # pylint: disable=g-import-not-at-top
  from conformer_fl import config_lib
  from conformer_fl import models
  from conformer_fl import steps
  from conformer_fl.federated import mesh as mesh_lib
  from conformer_fl.federated import fl_round as round_lib
  # pylint: enable=g-import-not-at-top
  config = config_lib.federated_run_config(size=_ROUND_MODEL.value)
  config.data = data_config
  config.model.vocab_size = tokenizer.vocab_size
  c = rounds[0].num_examples.shape[0]
  config.federated.clients_per_round = c
  config.federated.local_steps = _LOCAL_STEPS.value
  config.federated.client_batch_size = _CLIENT_BATCH_SIZE.value
  devices = max(n for n in range(1, jax.device_count() + 1) if c % n == 0)
  mesh = mesh_lib.make_client_mesh(devices)
  model = models.build_model(config.model)
  params, model_state = models.split_variables(
      models.init_variables(model, config.seed))
  round_fn, server_optimizer = steps.make_round_from_config(
      config, model, params, model_state, mesh)
  state = mesh_lib.replicate(
      round_lib.init_server_state(params, model_state, server_optimizer), mesh)
  rng = jax.random.key(0)
  start = time.perf_counter()
  state, metrics = round_fn(state, mesh_lib.shard_round_data(rounds[0], mesh),
                            rng)
  jax.block_until_ready((state, metrics))
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for data in rounds[1:]:
    state, metrics = round_fn(state, mesh_lib.shard_round_data(data, mesh), rng)
    jax.block_until_ready((state, metrics))
  return {"rounds": len(rounds) - 1, "seconds": time.perf_counter() - start,
          "compile_seconds": compile_seconds, "devices": devices}


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, ()))
