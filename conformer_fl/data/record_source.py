r"""Random access to a corpus split, and its speaker -> record index.

The federated clients are read from disk by record index, round by round
(conformer_fl/data/federated.py): a TFDS dataset prepared in the ArrayRecord
format (`file_format='array_record'`) is a random-access data source
(`builder.as_data_source`, the API of `tfds.data_source`), whose record i is
one utterance. `RecordSource` maps its records to the common example dict of
`input_pipeline` (the same mapping as `input_pipeline.load_split`):
  {'audio': int16 [N], 'text': str, 'speaker_id': str, 'domain': str,
   'duration': float, 'id': str}.

The speaker index (`load_speaker_index`) is built once per split by one pass
over the records and saved beside the dataset's files,
`<dataset folder>/speaker_index/<split>.json` (the dataset folder is
`builder.data_dir`, e.g. DATA_DIR/librispeech/default/2.1.1; a split string
such as 'train_clean100+train_clean360' is a file name as it is):
  {'format': 1, 'dataset': str, 'split': str, 'num_records': N,
   'speakers': {speaker id: [record indices, increasing]},
   'records': {'id':           [N] str,
               'speaker_id':   [N] str, or null / {'undecodable': base64},
               'text':         [N] str, or null / {'undecodable': base64},
               'domain':       [N] str ('' for LibriSpeech: `domain_of`),
               'num_samples':  [N] int,
               'audio_problem': [N] null, or [skip reason, detail]
                                (`batching.audio_problem`)}}
'speakers' holds the usable speaker ids (text, not blank) in sorted order.
With it a run knows every client's utterances, their lengths and
transcripts without reading any audio (`federated.get_client_datasets`),
and a round reads only its sampled clients' records.

The index is written by whichever process first needs it (a temporary file
renamed into place, so concurrent writers of the same content are safe), or
ahead of a run:
  python -m conformer_fl.data.record_source --dataset=librispeech \
      --split=train --data_dir=gs://BUCKET/tfds
"""

import base64
from collections.abc import Iterator, Sequence
import importlib
import json
from typing import Any
import uuid

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from conformer_fl import text as text_lib
from conformer_fl.data import batching
from conformer_fl.data import librispeech

Example = batching.Example

INDEX_FORMAT = 1
INDEX_FOLDER = "speaker_index"
# Records read per `__getitems__` call when a split is read in order.
_READ_CHUNK = 64
# With shuffle_files, a split is read in a seeded order of blocks of this many
# consecutive records (the random-access counterpart of TFDS's shard shuffle).
SHUFFLE_BLOCK = 256


class NotRandomAccess(ValueError):
  """The dataset is prepared in a format without random access (tfrecord)."""


def builder_for(dataset: str, data_dir: str | None,
                builder_config: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of a corpus name as `input_pipeline.load_split` takes it.

  Raises:
    librispeech.LibriSpeechNotPrepared: 'librispeech' is not prepared there.
  """
  data_dir = data_dir or None
  if dataset == "librispeech":
    builder = tfds.builder("librispeech", data_dir=data_dir)
    if not builder.is_prepared():
      raise librispeech.LibriSpeechNotPrepared(
          librispeech.not_prepared_message(data_dir))
    return builder
  if dataset == "synthetic_speech":
    # Registers the builder with TFDS.
    importlib.import_module("conformer_fl.data.synthetic_speech")
  name = f"{dataset}/{builder_config}" if builder_config else dataset
  return tfds.builder(name, data_dir=data_dir)


def is_random_access(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the prepared dataset has a random-access file format."""
  formats = builder.info.available_file_formats()
  return bool(formats & set(tfds.core.FileFormat.with_random_access()))


def check_random_access(builder: tfds.core.DatasetBuilder) -> None:
  """Raises NotRandomAccess (one line: the fix) unless `is_random_access`."""
  if not is_random_access(builder):
    raise NotRandomAccess(
        f"{builder.info.full_name} in {builder.data_dir} is prepared as"
        f" {builder.info.file_format.value} files, which cannot be read by"
        " record index (federated clients need it). Delete that folder (the"
        " local corpus is then rebuilt as ArrayRecord) or set"
        " --config.data.data_dir to another directory; prepare other"
        " datasets with file_format='array_record' (`tfds build DATASET"
        " --file_format=array_record`).")


def common_example(raw: dict[str, Any], domain_names: Sequence[str]) -> Example:
  """A record of a corpus with the synthetic corpus's features, as a common
  example (`input_pipeline` documents the dict)."""
  text = batching.decode_text(raw["text"])
  return {
      "audio": raw["audio"],
      "text": text_lib.normalize_text(text) if isinstance(text, str) else text,
      "speaker_id": batching.decode_text(raw["speaker_id"]),
      "domain": domain_names[int(raw["domain"])],
      "duration": float(raw["duration"]),
      "id": _as_str(raw["id"]),
  }


class RecordSource:
  """One split of a corpus, read by record index (module docstring).

  Attributes:
    dataset: the corpus name ('librispeech', 'synthetic_speech' or a TFDS name
      with the synthetic corpus's features).
    split: the project's split name ('train', 'dev', ... or a TFDS split
      string), as the index file is named.
    dataset_dir: the folder of the dataset's files (`builder.data_dir`).
    records_read: records read so far by `read` (a count, for tests and
      measurements).
  """

  def __init__(
      self, dataset: str, split: str, data_dir: str | None = None,
      builder_config: str | None = None,
      librispeech_options: librispeech.LibriSpeechOptions | None = None):
    """Opens the split.

    Args:
      dataset: corpus name, as `input_pipeline.load_split` takes it.
      split: split name ('train' maps through the LibriSpeech split map).
      data_dir: TFDS data directory (None/'' = TFDS default).
      builder_config: builder config name (e.g. 'tiny'); ignored for
        LibriSpeech.
      librispeech_options: split map and domain rule for LibriSpeech.

    Raises:
      NotRandomAccess: the dataset is prepared only as tfrecord files.
      librispeech.LibriSpeechNotPrepared: LibriSpeech is not prepared.
    """
    self.dataset = dataset
    self.split = split
    self._is_librispeech = dataset == "librispeech"
    self._options = librispeech_options or librispeech.LibriSpeechOptions()
    builder = builder_for(dataset, data_dir, builder_config)
    check_random_access(builder)
    self.dataset_dir = epath.Path(builder.data_dir)
    tfds_split = (librispeech.tfds_split(split, self._options)
                  if self._is_librispeech else split)
    self._source = builder.as_data_source(split=tfds_split)
    self._domain_names = (None if self._is_librispeech
                          else builder.info.features["domain"].names)
    self.records_read = 0

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: Sequence[int]) -> list[Example]:
    """The common examples of records `indices`, in that order."""
    indices = [int(i) for i in indices]
    if not indices:
      return []
    raws = self._source.__getitems__(indices)
    self.records_read += len(indices)
    return [self._to_common(raw) for raw in raws]

  def iterate(self, shuffle_files: bool = False,
              seed: int = 0) -> Iterator[Example]:
    """Every record once: in order, or in a seeded order of blocks of
    `SHUFFLE_BLOCK` consecutive records (`shuffle_files`)."""
    order = np.arange(len(self))
    if shuffle_files:
      blocks = [order[i:i + SHUFFLE_BLOCK]
                for i in range(0, order.size, SHUFFLE_BLOCK)]
      # numpy's permutation, not grain's `MapDataset.shuffle`: grain's order
      # differs, so the streamed epochs of reported runs would change.
      permutation = np.random.default_rng([seed, 7]).permutation(len(blocks))
      order = np.concatenate([blocks[b] for b in permutation] or [order])
    for start in range(0, order.size, _READ_CHUNK):
      yield from self.read(order[start:start + _READ_CHUNK])

  def domain_of(self, stored_domain: str, num_samples: int) -> str:
    """The common 'domain' of a record from its index entry.

    LibriSpeech has no domain feature: its domain follows from the length by
    the LibriSpeech options (`librispeech.domain_of`), so one index serves any
    options.
    """
    if self._is_librispeech:
      return librispeech.domain_of(num_samples / librispeech.SAMPLE_RATE,
                                   self._options)
    return stored_domain

  def _to_common(self, raw: dict[str, Any]) -> Example:
    if self._is_librispeech:
      return librispeech.to_common_example(raw, self._options)
    return common_example(raw, self._domain_names)


def index_path(source: RecordSource) -> epath.Path:
  """Where the speaker index of `source`'s split is saved."""
  return source.dataset_dir / INDEX_FOLDER / f"{source.split}.json"


def build_speaker_index(source: RecordSource) -> dict[str, Any]:
  """The speaker index of `source`'s split (module docstring), by one pass."""
  columns = {key: [] for key in ("id", "speaker_id", "text", "domain",
                                 "num_samples", "audio_problem")}
  speakers: dict[str, list[int]] = {}
  for i, example in enumerate(source.iterate()):
    audio = example["audio"]
    speaker = batching.decode_text(example["speaker_id"])
    columns["id"].append(_as_str(example["id"]))
    columns["speaker_id"].append(_json_text(speaker))
    columns["text"].append(_json_text(batching.decode_text(example["text"])))
    columns["domain"].append(
        "" if source.dataset == "librispeech" else example["domain"])
    columns["num_samples"].append(
        int(audio.shape[0]) if isinstance(audio, np.ndarray) and audio.ndim
        else 0)
    problem = batching.audio_problem(audio)
    columns["audio_problem"].append(None if problem is None else list(problem))
    if isinstance(speaker, str) and speaker.strip():
      speakers.setdefault(speaker, []).append(i)
  return {
      "format": INDEX_FORMAT,
      "dataset": source.dataset,
      "split": source.split,
      "num_records": len(source),
      "speakers": {s: speakers[s] for s in sorted(speakers)},
      "records": columns,
  }


def load_speaker_index(source: RecordSource,
                       build_if_missing: bool = True) -> dict[str, Any]:
  """The saved speaker index of `source`'s split, built and saved if missing.

  Raises:
    FileNotFoundError: no index and build_if_missing is False.
    ValueError: the saved index does not match the data (another format or
      number of records): delete it to rebuild.
  """
  path = index_path(source)
  if path.exists():
    index = json.loads(path.read_text())
    if (index.get("format") != INDEX_FORMAT
        or index.get("num_records") != len(source)):
      raise ValueError(
          f"The speaker index {path} (format {index.get('format')},"
          f" {index.get('num_records')} records) does not match the split"
          f" ({len(source)} records, format {INDEX_FORMAT}); delete it and it"
          " is built again.")
    return index
  if not build_if_missing:
    raise FileNotFoundError(f"No speaker index at {path}.")
  logging.info("Building the speaker index of %s:%s (%d records).",
               source.dataset, source.split, len(source))
  index = build_speaker_index(source)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  tmp.write_text(json.dumps(index))
  # Every host of a pod may build it at once (into a shared data_dir): the
  # indexes are equal, so the last replace wins harmlessly.
  tmp.replace(path)
  logging.info("Saved the speaker index (%d speakers) to %s.",
               len(index["speakers"]), path)
  return index


def index_example(index: dict[str, Any], i: int) -> tuple[Example, int,
                                                          tuple[str, str] | None]:
  """Record i of an index: (common example without 'audio', num_samples,
  audio problem or None)."""
  records = index["records"]
  problem = records["audio_problem"][i]
  return ({
      "id": records["id"][i],
      "speaker_id": _from_json_text(records["speaker_id"][i]),
      "text": _from_json_text(records["text"][i]),
      "domain": records["domain"][i],
  }, int(records["num_samples"][i]), None if problem is None else tuple(problem))


def _json_text(value: Any) -> Any:
  """A text field for JSON: str or None as they are; bytes (not UTF-8) as
  {'undecodable': base64}; an integer (LibriSpeech speaker id) as str."""
  if isinstance(value, bytes):
    return {"undecodable": base64.b64encode(value).decode("ascii")}
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return str(value)
  if value is None or isinstance(value, str):
    return value
  raise TypeError(f"Cannot index a text field of type {type(value).__name__}.")


def _from_json_text(value: Any) -> Any:
  if isinstance(value, dict):
    return base64.b64decode(value["undecodable"])
  return value


def _as_str(value: Any) -> str:
  """An utterance id as str (bytes that are not UTF-8 escaped, for logs)."""
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="backslashreplace")
  return str(value)


def main(argv: Sequence[str]) -> None:
  """CLI: builds (or checks) the speaker index of one split."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  source = RecordSource(f.dataset, f.split, f.data_dir, f.builder_config)
  index = load_speaker_index(source)
  print(f"{index_path(source)}: {index['num_records']} records,"
        f" {len(index['speakers'])} speakers")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("dataset", "synthetic_speech",
                      "'librispeech', 'synthetic_speech' or a TFDS name.")
  flags.DEFINE_string("split", "train", "Split name ('train' for clients).")
  flags.DEFINE_string("data_dir", None, "TFDS data directory.")
  flags.DEFINE_string("builder_config", "",
                      "Builder config (e.g. 'demo'); '' for LibriSpeech.")
  app.run(main)
