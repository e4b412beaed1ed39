"""Builds or refuses a run's corpus, the same way for every entry point.

`ensure_prepared(data_config, random_access)`:
  * the local synthetic corpus (`data.dataset == 'synthetic_speech'`) is
    synthesized in the ArrayRecord format (`synthetic_speech.build`'s default)
    when it is not prepared in `data.data_dir`: by process 0, the others wait.
    Central runs read ArrayRecord too (`input_pipeline.load_split`), so a
    central run followed by a federated run on the same data_dir works.
  * LibriSpeech is never prepared implicitly: `LibriSpeechNotPrepared` names
    the command that prepares it.
  * with `random_access` (federated clients read records by index), a corpus
    prepared only as tfrecord files is refused with `NotRandomAccess`.

Nothing is written to the run's workdir here.
"""

import json
from typing import Any

import ml_collections

from conformer_fl import multihost
from conformer_fl.data import record_source


def is_local(data_config: ml_collections.ConfigDict) -> bool:
  """Whether the corpus is synthesized here (rather than prepared elsewhere)."""
  return data_config.dataset == "synthetic_speech"


def _builder(data_config: ml_collections.ConfigDict):
  """The corpus's TFDS builder (raises LibriSpeechNotPrepared for LibriSpeech)."""
  return record_source.builder_for(data_config.dataset,
                                   data_config.data_dir or None,
                                   data_config.builder_config or None)


def is_prepared(data_config: ml_collections.ConfigDict) -> bool:
  """Whether the local corpus is prepared (True for a corpus prepared elsewhere)."""
  return not is_local(data_config) or _builder(data_config).is_prepared()


def read_card(data_config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The local corpus's corpus_card.json (None: not local, or no card)."""
  if not is_local(data_config):
    return None
  from conformer_fl.data import corpus_card  # pylint: disable=g-import-not-at-top
  path = _builder(data_config).data_path / corpus_card.CARD_FILE
  return json.loads(path.read_text()) if path.exists() else None


def ensure_prepared(data_config: ml_collections.ConfigDict,
                    random_access: bool) -> None:
  """Builds the local corpus unless prepared; refuses one the run cannot read.

  Args:
    data_config: the run's `config.data`.
    random_access: whether the run reads records by index (federated).

  Raises:
    tts_engines.MissingSystemPackagesError: the local corpus must be built and
      its Debian packages are missing (checked before anything is written).
    librispeech.LibriSpeechNotPrepared: LibriSpeech is not prepared.
    record_source.NotRandomAccess: `random_access` and the corpus is prepared
      only as tfrecord files.
  """
  builder = _builder(data_config)
  if is_local(data_config) and not multihost.chief_decides(
      builder.is_prepared(), "corpus_prepared"):
    if multihost.is_chief():
      # pylint: disable-next=g-import-not-at-top
      from conformer_fl.data import synthetic_speech
      synthetic_speech.build(data_config.builder_config,
                             data_config.data_dir or None)
    multihost.sync("corpus_built")  # The others wait for process 0.
    builder = _builder(data_config)
  if random_access:
    record_source.check_random_access(builder)
