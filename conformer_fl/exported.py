"""A self-contained trained model, as `python -m conformer_fl.export` writes it.

A directory with:
  config.json       the run config (`config.model` builds the model,
                    `config.data.tokenizer` the tokenizer)
  tokenizer.model   the SentencePiece model (absent for a character tokenizer)
  params.msgpack    the model variables {'params': ..., [model state]}
                    (`flax.serialization.msgpack_serialize`; no orbax needed)
  model_card.json   what the model is and how well it did (`export` documents
                    the fields)
  MODEL_CARD.md     the same, for people

Load it in a project:

  from conformer_fl import exported
  loaded = exported.load_model(DIR)     # model, variables, tokenizer, config, card
  outputs = loaded.model.apply(loaded.variables, audio, paddings, labels,
                               label_paddings, train=False)

or transcribe with it: `python -m conformer_fl.tools.transcribe --workdir=DIR
FILE`, `transcribe.Transcriber(DIR)`.
"""

import json
import os
from typing import Any, NamedTuple

from etils import epath
import flax.serialization
import ml_collections

from conformer_fl import models
from conformer_fl.data import tokenizer as tokenizer_lib

FORMAT = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"
CARD_FILE = "model_card.json"
CARD_MARKDOWN_FILE = "MODEL_CARD.md"
TOKENIZER_FILE = tokenizer_lib.TOKENIZER_FILENAME


class LoadedModel(NamedTuple):
  """An exported model, ready to apply.

  Attributes:
    model: the `models.ConformerASR`.
    variables: {'params': ..., [model state]} (host numpy).
    tokenizer: the run's tokenizer (ids <-> text).
    config: the run config.
    card: model_card.json.
  """
  model: Any
  variables: dict[str, Any]
  tokenizer: tokenizer_lib.Tokenizer
  config: ml_collections.ConfigDict
  card: dict[str, Any]


def is_exported(directory: str | os.PathLike[str]) -> bool:
  """Whether `directory` holds an exported model (its card and params)."""
  directory = epath.Path(directory)
  return (directory / CARD_FILE).exists() and (directory / PARAMS_FILE).exists()


def read(directory: str | os.PathLike[str]
         ) -> tuple[ml_collections.ConfigDict, dict[str, Any], dict[str, Any]]:
  """(config, variables, card) of an exported model.

  Raises:
    ValueError: the directory's model card has another format.
  """
  directory = epath.Path(directory)
  card = json.loads((directory / CARD_FILE).read_text())
  if card.get("format") != FORMAT:
    raise ValueError(f"{directory}: model card format {card.get('format')!r};"
                     f" this version reads format {FORMAT}")
  config = ml_collections.ConfigDict(
      json.loads((directory / CONFIG_FILE).read_text()))
  variables = flax.serialization.msgpack_restore(
      (directory / PARAMS_FILE).read_bytes())
  return config, variables, card


def load_model(directory: str | os.PathLike[str]) -> LoadedModel:
  """The model, variables, tokenizer, config and card of an exported model."""
  config, variables, card = read(directory)
  if (config.data.tokenizer.kind == "sentencepiece"
      and not (epath.Path(directory) / TOKENIZER_FILE).exists()):
    raise ValueError(f"{directory}: no {TOKENIZER_FILE} (the model's"
                     " SentencePiece tokenizer)")
  tokenizer = tokenizer_lib.build_tokenizer(config.data.tokenizer, None,
                                            epath.Path(directory))
  return LoadedModel(models.build_model(config.model), variables, tokenizer,
                     config, card)
