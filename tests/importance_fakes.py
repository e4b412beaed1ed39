"""Hand-made `Importance` results for tests that need only a few of its fields.

  result = importance_fakes.importance(
      {"encoder/block_00": importance_fakes.unit(0.0, label="ambient")},
      num_blocks=1)

Every field a test does not give gets a fixed filler value; the ambient /
critical / undetermined lists follow the units' labels unless given.
"""

from collections.abc import Mapping, Sequence

from conformer_fl.analysis import importance_file


def unit(wer_increase: float, *, loss_increase: float | None = None,
         label: str | None = "undetermined", num_params: int = 10,
         relative_distance: float | None = 0.5,
         rms_movement: float | None = 0.1) -> importance_file.Unit:
  """A unit with these numbers (loss_increase defaults to wer_increase)."""
  return importance_file.Unit(
      path=("unit",), num_params=num_params, reinit_wer=(0.5 + wer_increase,),
      reinit_loss=(1.0,), rerandomize_wer=(), rerandomize_loss=(),
      wer_increase=wer_increase, wer_increase_low=wer_increase - 0.01,
      wer_increase_high=wer_increase + 0.01, relative_wer_increase=None,
      loss_increase=(wer_increase if loss_increase is None
                     else loss_increase),
      rerandomize_wer_increase=None, label=label,
      movement=importance_file.Movement(
          distance=1.0, initial_norm=2.0, relative_distance=relative_distance,
          rms_movement=rms_movement, update_norm_sum=None))


def importance(units: Mapping[str, importance_file.Unit], *,
               num_blocks: int = 1,
               ambient: Sequence[str] | None = None
               ) -> importance_file.Importance:
  """An Importance of `units`; `ambient` overrides the labels' list."""
  by_label = {label: tuple(n for n, u in units.items() if u.label == label)
              for label in ("ambient", "critical", "undetermined")}
  if ambient is not None:
    by_label["ambient"] = tuple(ambient)
  return importance_file.Importance(
      schema_version=1, workdir="/runs/fake", step_key="step",
      granularity="module", trained_step=4, checkpoint_steps=(0, 4),
      taus=(0,), rerandomize_seeds=(),
      model=importance_file.ModelInfo(num_blocks=num_blocks, model_dim=8,
                                      conv_norm="group_norm", decoder="ctc",
                                      num_params=100),
      eval=importance_file.EvalInfo(split="dev", domains=(), num_batches=1,
                                    num_examples=4.0),
      thresholds=importance_file.Thresholds(
          max_abs_wer_increase=0.01, max_rel_wer_increase=0.05, rule="either",
          wer_increase=0.025, confidence=0.95, bootstrap_samples=100),
      baseline=importance_file.Baseline(wer=0.5, loss=1.0, cer=0.2,
                                        wer_interval=(0.4, 0.6),
                                        num_speakers=2),
      units=dict(units), movement_test=None, correlations={}, stability=None,
      timing={}, **by_label)
