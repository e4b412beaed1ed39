"""TFDS stand-in corpora for tests: small builders with the synthetic corpus's features.

  def _examples():              # yields (key, example dict)
    yield "u0", {"audio": ..., "text": ..., "speaker_id": ..., "domain": 1,
                 "duration": ..., "id": "u0"}

  CflMyStandIn = stand_ins.builder_class(
      "CflMyStandIn", "Train: 3 utterances.", {"train": _examples})
  CflMyStandIn(data_dir=data_dir).download_and_prepare(
      file_format="array_record")   # the TFDS name is 'cfl_my_stand_in'
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

from conformer_fl.data import synthetic_speech

Examples = Callable[[], Iterator[tuple[str, dict[str, Any]]]]


def builder_class(class_name: str, doc: str,
                  splits: Mapping[str, Examples]
                  ) -> type[tfds.core.GeneratorBasedBuilder]:
  """A TFDS builder class (registered under the snake case of class_name).

  Args:
    class_name: e.g. 'CflClientsStandIn'; one class per name and session.
    doc: its docstring (what the splits hold).
    splits: {split name: a function yielding its (key, example) pairs}.
  """

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=synthetic_speech.features())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in splits}

  def _generate_examples(self, split):
    yield from splits[split]()

  return type(class_name, (tfds.core.GeneratorBasedBuilder,), {
      "__doc__": doc, "__module__": __name__,
      "VERSION": tfds.core.Version("1.0.0"), "_info": _info,
      "_split_generators": _split_generators,
      "_generate_examples": _generate_examples})
