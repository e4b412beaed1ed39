"""`Importance`: a run's analysis/importance.json as typed fields.

The analysis pass (`importance.run_analysis`) builds one and writes it with
`Importance.write`; every reader (the experiment's arms, summary, half-width
and stability stages, the analysis's report and stability comparison) reads
it with `Importance.read` and uses its attributes. The file's format is the
schema of the package docstring (`conformer_fl.analysis`, schema_version 1):
`to_json` gives that dict, key for key and in that order, and `from_json`
reads it back (`from_json(x.to_json()) == x`). Sequences are tuples here and
lists in the file.

Fields a reader may find absent, in files written before they existed, are
None here: a unit's `label` and interval, the baseline's CER, interval and
speaker count, the thresholds' confidence and resample count, the movement
test. Any other missing field is an error naming it.

The statistics records (`movement_test`, `correlations`, `stability`,
`timing`) stay the plain dicts their functions return
(`movement_test.primary_movement_test`, `importance.movement_correlations`,
`stability.compare_runs`).
"""

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

from etils import epath

from conformer_fl import workdir as workdir_lib

IMPORTANCE_FILE = "importance.json"
SCHEMA_VERSION = 1


class ImportanceFileError(ValueError):
  """An importance.json that lacks a field (one line: which, and the fix)."""


def _plain(value: Any) -> Any:
  """`value` as JSON holds it: dataclasses to dicts, tuples to lists."""
  if hasattr(value, "to_json"):
    return value.to_json()
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _fields_json(record: Any) -> dict[str, Any]:
  return {f.name: _plain(getattr(record, f.name))
          for f in dataclasses.fields(record)}


class _Reader:
  """Reads the fields of one JSON object, naming a missing one by its path."""

  def __init__(self, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
      raise ImportanceFileError(
          f"importance.json: {where or 'the file'} is not an object; analyse"
          " the run again.")
    self.data = data
    self.where = where

  def __call__(self, key: str) -> Any:
    if key not in self.data:
      raise ImportanceFileError(
          f"importance.json lacks {self.where}{key}: analyse the run again"
          " (configs/analysis.py).")
    return self.data[key]

  def optional(self, key: str) -> Any:
    return self.data.get(key)

  def floats(self, key: str) -> tuple[float, ...]:
    return tuple(self(key))

  def nested(self, key: str) -> "_Reader":
    return _Reader(self(key), f"{self.where}{key}.")


@dataclasses.dataclass(frozen=True)
class Movement:
  """How far a unit moved from its initial value (`movement.unit_movement`).

  Attributes:
    distance: ||theta(T) - theta(0)||.
    initial_norm: ||theta(0)||.
    relative_distance: distance / initial_norm (None when that is 0).
    rms_movement: distance / sqrt(parameters) (None for no parameters).
    update_norm_sum: the summed per-round update norms (federated runs;
      None for central runs).
  """
  distance: float
  initial_norm: float
  relative_distance: float | None
  rms_movement: float | None
  update_norm_sum: float | None

  def to_json(self) -> dict[str, Any]:
    return _fields_json(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any], where: str = "") -> "Movement":
    get = _Reader(data, where)
    return cls(distance=get("distance"), initial_norm=get("initial_norm"),
               relative_distance=get("relative_distance"),
               rms_movement=get("rms_movement"),
               update_norm_sum=get.optional("update_norm_sum"))


@dataclasses.dataclass(frozen=True)
class Unit:
  """One unit's resets, its importance and its label.

  Attributes:
    path: its path in the params tree.
    num_params: its parameters.
    reinit_wer: [len(taus)] WER with the unit reset to taus[i].
    reinit_loss: [len(taus)] mean loss per utterance, same order.
    rerandomize_wer: [len(rerandomize_seeds)] WER per re-randomization.
    rerandomize_loss: [len(rerandomize_seeds)] loss, same order.
    wer_increase: reinit_wer[0] - baseline WER (the importance).
    wer_increase_low, wer_increase_high: its paired interval.
    relative_wer_increase: wer_increase / baseline WER (None if that is 0).
    loss_increase: reinit_loss[0] - baseline loss.
    rerandomize_wer_increase: mean re-randomized WER - baseline (None
      without seeds).
    label: 'ambient' | 'critical' | 'undetermined'.
    movement: its weight movement.
  """
  path: tuple[str, ...]
  num_params: int
  reinit_wer: tuple[float, ...]
  reinit_loss: tuple[float, ...]
  rerandomize_wer: tuple[float, ...]
  rerandomize_loss: tuple[float, ...]
  wer_increase: float
  wer_increase_low: float | None
  wer_increase_high: float | None
  relative_wer_increase: float | None
  loss_increase: float
  rerandomize_wer_increase: float | None
  label: str | None
  movement: Movement

  @property
  def ambient(self) -> bool:
    return self.label == "ambient"

  def to_json(self) -> dict[str, Any]:
    fields = _fields_json(self)
    movement = fields.pop("movement")
    return dict(fields, ambient=self.ambient, movement=movement)

  @classmethod
  def from_json(cls, data: Mapping[str, Any], where: str = "") -> "Unit":
    get = _Reader(data, where)
    return cls(
        path=tuple(get("path")), num_params=get("num_params"),
        reinit_wer=get.floats("reinit_wer"),
        reinit_loss=get.floats("reinit_loss"),
        rerandomize_wer=get.floats("rerandomize_wer"),
        rerandomize_loss=get.floats("rerandomize_loss"),
        wer_increase=get("wer_increase"),
        wer_increase_low=get.optional("wer_increase_low"),
        wer_increase_high=get.optional("wer_increase_high"),
        relative_wer_increase=get("relative_wer_increase"),
        loss_increase=get("loss_increase"),
        rerandomize_wer_increase=get("rerandomize_wer_increase"),
        label=get.optional("label"),
        movement=Movement.from_json(get("movement"), f"{where}movement."))


@dataclasses.dataclass(frozen=True)
class Baseline:
  """The trained model, no unit reset.

  Attributes:
    wer, loss, cer: its corpus WER, mean loss and CER (None if not measured).
    wer_interval: (low, high) bootstrap interval of the WER, or None.
    num_speakers: speakers of the evaluation, or None.
  """
  wer: float
  loss: float
  cer: float | None
  wer_interval: tuple[float, float] | None
  num_speakers: int | None

  def to_json(self) -> dict[str, Any]:
    return _fields_json(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any], where: str = "") -> "Baseline":
    get = _Reader(data, where)
    interval = get.optional("wer_interval")
    return cls(wer=get("wer"), loss=get("loss"), cer=get.optional("cer"),
               wer_interval=tuple(interval) if interval is not None else None,
               num_speakers=get.optional("num_speakers"))


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """The labelling rule (`importance.wer_threshold`, `label_unit`).

  Attributes:
    max_abs_wer_increase, max_rel_wer_increase: the absolute and relative
      bounds of the config.
    rule: 'either' | 'both'.
    wer_increase: the threshold they give at the baseline WER.
    confidence: of each unit's paired interval (None if absent).
    bootstrap_samples: resamples of each interval (None if absent).
  """
  max_abs_wer_increase: float
  max_rel_wer_increase: float
  rule: str
  wer_increase: float
  confidence: float | None
  bootstrap_samples: int | None

  def to_json(self) -> dict[str, Any]:
    return _fields_json(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any],
                where: str = "") -> "Thresholds":
    get = _Reader(data, where)
    return cls(max_abs_wer_increase=get("max_abs_wer_increase"),
               max_rel_wer_increase=get("max_rel_wer_increase"),
               rule=get("rule"), wer_increase=get("wer_increase"),
               confidence=get.optional("confidence"),
               bootstrap_samples=get.optional("bootstrap_samples"))


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """The analysed model: blocks, width, conv norm, decoder, parameters."""
  num_blocks: int
  model_dim: int
  conv_norm: str
  decoder: str
  num_params: int

  def to_json(self) -> dict[str, Any]:
    return _fields_json(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any],
                where: str = "") -> "ModelInfo":
    get = _Reader(data, where)
    return cls(**{f.name: get(f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class EvalInfo:
  """The evaluation: split, domains (() = all), batches, utterances."""
  split: str
  domains: tuple[str, ...]
  num_batches: int
  num_examples: float

  def to_json(self) -> dict[str, Any]:
    return _fields_json(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any], where: str = "") -> "EvalInfo":
    get = _Reader(data, where)
    return cls(split=get("split"), domains=tuple(get("domains")),
               num_batches=get("num_batches"),
               num_examples=get("num_examples"))


@dataclasses.dataclass(frozen=True)
class Figure:
  """A figure of analysis/: its file name and size in pixels."""
  file: str
  width: int
  height: int

  def to_json(self) -> dict[str, Any]:
    return _fields_json(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any], where: str = "") -> "Figure":
    get = _Reader(data, where)
    return cls(file=get("file"), width=get("width"), height=get("height"))


@dataclasses.dataclass(frozen=True)
class Importance:
  """analysis/importance.json (fields as in the package docstring).

  Attributes:
    schema_version: 1.
    workdir: absolute path (or URI) of the analysed run.
    step_key: 'step' (central) | 'round' (federated).
    granularity: 'block' | 'module'.
    trained_step: the checkpoint T whose units are reset.
    checkpoint_steps: every saved step of the run.
    taus: re-initialization checkpoints, ascending, taus[0] == 0.
    rerandomize_seeds: init seeds of the re-randomization draws.
    model: the analysed model.
    eval: the evaluation.
    thresholds: the labelling rule.
    baseline: the trained model's metrics.
    units: {unit name: Unit} in model order.
    ambient, critical, undetermined: unit names by label, in model order.
    movement_test: the primary test (`movement_test.primary_movement_test`)
      or None.
    correlations: {measure: {'wer_increase' | 'loss_increase': rank
      correlations}} (`importance.movement_correlations`).
    stability: `stability.compare_runs` against other runs, or None.
    timing: {'evaluation_seconds', 'num_variants', 'variants_per_call',
      'vectorized'}.
    figures: {name: Figure} of the figures written to analysis/.
  """
  schema_version: int
  workdir: str
  step_key: str
  granularity: str
  trained_step: int
  checkpoint_steps: tuple[int, ...]
  taus: tuple[int, ...]
  rerandomize_seeds: tuple[int, ...]
  model: ModelInfo
  eval: EvalInfo
  thresholds: Thresholds
  baseline: Baseline
  units: Mapping[str, Unit]
  ambient: tuple[str, ...]
  critical: tuple[str, ...]
  undetermined: tuple[str, ...]
  movement_test: Mapping[str, Any] | None
  correlations: Mapping[str, Any]
  stability: Mapping[str, Any] | None
  timing: Mapping[str, Any]
  figures: Mapping[str, Figure] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    """The importance.json dict (package docstring)."""
    return _fields_json(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "Importance":
    """Reads the importance.json dict.

    Raises:
      ImportanceFileError: a required field is absent (named).
    """
    get = _Reader(data, "")
    units = get("units")
    return cls(
        schema_version=get("schema_version"), workdir=get("workdir"),
        step_key=get("step_key"), granularity=get("granularity"),
        trained_step=get("trained_step"),
        checkpoint_steps=tuple(get("checkpoint_steps")),
        taus=tuple(get("taus")),
        rerandomize_seeds=tuple(get("rerandomize_seeds")),
        model=ModelInfo.from_json(get("model"), "model."),
        eval=EvalInfo.from_json(get("eval"), "eval."),
        thresholds=Thresholds.from_json(get("thresholds"), "thresholds."),
        baseline=Baseline.from_json(get("baseline"), "baseline."),
        units={name: Unit.from_json(unit, f"units.{name}.")
               for name, unit in units.items()},
        ambient=tuple(get("ambient")), critical=tuple(get("critical")),
        undetermined=tuple(get("undetermined")),
        movement_test=get.optional("movement_test"),
        correlations=get("correlations"),
        stability=get.optional("stability"),
        timing=get("timing"),
        figures={key: Figure.from_json(figure, f"figures.{key}.")
                 for key, figure in (get.optional("figures") or {}).items()})

  @staticmethod
  def path(workdir: str | os.PathLike[str]) -> epath.Path:
    """`workdir`/analysis/importance.json."""
    return workdir_lib.Workdir(workdir).analysis_dir / IMPORTANCE_FILE

  @classmethod
  def exists(cls, workdir: str | os.PathLike[str]) -> bool:
    """Whether the analysis pass has written `workdir`'s importance.json."""
    return cls.path(workdir).exists()

  @classmethod
  def read(cls, workdir: str | os.PathLike[str]) -> "Importance":
    """`workdir`'s analysis/importance.json (the workdir local or `gs://`).

    Raises:
      FileNotFoundError: the analysis has not run on `workdir`.
      ImportanceFileError: the file lacks a field.
    """
    path = cls.path(workdir)
    if not path.exists():
      raise FileNotFoundError(f"No {path}: run the analysis pass on {workdir}"
                              " first (configs/analysis.py).")
    return cls.from_json(json.loads(path.read_text()))

  def write(self, workdir: str | os.PathLike[str]) -> epath.Path:
    """Writes `workdir`/analysis/importance.json (made if absent); its path.

    Raises:
      ValueError: a NaN or infinite number (the file holds null instead).
    """
    path = self.path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False))
    return path
