"""Layer importance by resetting units (Zhang, Bengio and Singer, 2019).

A separate pass over a trained run's workdir W:
  python -m conformer_fl.main --config=configs/analysis.py --workdir=W
Each unit of the model (`conformer_fl.models.list_units` at
`config.analysis.granularity`) of the trained checkpoint T is, one at a time:
  * re-initialized: replaced by its value at a saved checkpoint tau, for every
    tau of `config.analysis.taus` (tau = 0 is the initial value);
  * re-randomized: replaced by a fresh draw from its initializer (the model
    initialized with seed run_seed + rerandomize_seed_offset + i).
A unit's batch-norm statistics are reset with it. Every variant and the trained
model are evaluated (WER, loss) on the eval split by one compiled function:
variants stacked on a leading axis and vmapped, `variants_per_call` at a time
(`variant_eval`). Each unit's WER increase after the tau = 0 reset gets a
paired 95% interval (the variant and the trained model on the same
utterances; speakers, then utterances within them, resampled:
`conformer_fl.stats`): the unit is ambient when the interval's upper bound
lies below the threshold (`importance.wer_threshold`), critical when its
lower bound lies above it, undetermined otherwise (`importance.label_unit`).
Weight movement (`movement`) against importance, with one primary test
stratified by module type (`movement_test`) and secondary rank
correlations, stability across runs (`stability`), figures (`plots`) and a
report (`report`) complete it.

Choices the papers leave open (config fields, configs/analysis.py): the
thresholds (default: ambient when the WER rises by <= 0.01 absolute or <= 5%
of the baseline WER), taus (every saved checkpoint), 3 re-randomization seeds,
block granularity. For a federated run started from a pre-trained model
(federated.init_workdir), round 0 is that model: tau = 0 and the movement
then measure change from it, not from random initialization. On several hosts
every process runs the pass: each vectorized call's variants are split over all
devices of all hosts and process 0 writes the outputs (`importance`).

Outputs in W/analysis/: importance.json, heatmap_wer.png, heatmap_loss.png
(units x tau), rerandomization.png, movement_scatter.png,
stability_depth.png (with compare_workdirs), report.md.

importance.json (schema_version 1), read and written as
`importance_file.Importance` (`Importance.read(W)`, its fields named as the
keys below). Numbers are plain JSON floats; undefined ones are null (never
NaN). "WER" is corpus WER (0.1 = 10%).
{
  "schema_version": 1,
  "workdir": str,                 absolute path of the analyzed run
  "step_key": "step" | "round",   central or federated checkpoints
  "granularity": "block" | "module",
  "trained_step": int,            the checkpoint T whose units are reset
  "checkpoint_steps": [int],      every saved step of the run
  "taus": [int],                  re-initialization checkpoints, ascending, taus[0] == 0
  "rerandomize_seeds": [int],     init seeds of the re-randomization draws
  "model": {"num_blocks", "model_dim", "conv_norm", "decoder", "num_params"},
  "eval": {"split": str, "domains": [str] ([] = all), "num_batches": int,
           "num_examples": float},
  "thresholds": {"max_abs_wer_increase": float, "max_rel_wer_increase": float,
                 "rule": "either" | "both", "wer_increase": the threshold
                 (`importance.wer_threshold`), "confidence": float,
                 "bootstrap_samples": int},
  "baseline": {"wer": float, "loss": float, "cer": float, "wer_interval":
               [low, high], "num_speakers": int},   the trained model
  "units": {                       in model order (subsampling, blocks, decoder)
    "<unit name, e.g. encoder/block_03/conv>": {
      "path": [str],               its path in the params tree
      "num_params": int,
      "reinit_wer": [float],       WER with the unit reset to taus[i]
      "reinit_loss": [float],      mean loss per utterance, same order
      "rerandomize_wer": [float],  per rerandomize_seeds[i]
      "rerandomize_loss": [float],
      "wer_increase": float,       reinit_wer[0] - baseline wer (the importance)
      "wer_increase_low", "wer_increase_high": float,  its paired interval
      "relative_wer_increase": float | null,   / baseline wer (null if 0)
      "loss_increase": float,      reinit_loss[0] - baseline loss
      "rerandomize_wer_increase": float | null,  mean over seeds - baseline
      "movement": {"distance": ||theta(T)-theta(0)||, "initial_norm":
                   ||theta(0)||, "relative_distance": float | null,
                   "rms_movement": distance / sqrt(parameters),
                   "update_norm_sum": float | null (federated runs only)},
      "label": "ambient" | "critical" | "undetermined",
      "ambient": bool              label == "ambient"
    }, ...
  },
  "ambient": [unit names],        in model order, by label
  "critical": [unit names],
  "undetermined": [unit names],
  "movement_test": {"measure", "units", "num_units", "strata", "spearman",
      "pvalue", "partial_spearman_log_params", "partial_pvalue",
      "num_permutations"}         the primary test (`movement_test`)
  "correlations": {"distance" | "relative_distance" | "rms_movement" |
                   "update_norm_sum": {        secondary
      "wer_increase" | "loss_increase": {"num_units": int,
          "spearman": {"statistic", "pvalue"}, "kendall": {"statistic",
          "pvalue"}}}},
  "stability": null | {"runs": [workdir], "pairs": [{"a", "b",
      "num_common_units" (pairs of matched units), "matching": "name" |
      "relative_depth", "both_empty", "jaccard_ambient" (null when
      both_empty), "chance_jaccard_ambient", "overlap_pvalue",
      "chance_jaccard_within_types", "overlap_pvalue_within_types",
      "intersection", "wer_increase": correlations,
      "loss_increase": correlations}], "depth": {workdir: {"num_blocks",
      "points": [{"unit", "relative_depth", "wer_increase", "loss_increase"}],
      "wer_increase_vs_depth": correlations, "loss_increase_vs_depth": ...}},
      "ambient_frequency": {unit: {"runs", "ambient", "frequency"}}},
  "timing": {"evaluation_seconds", "num_variants", "variants_per_call",
             "vectorized"},
  "figures": {"heatmap_wer" | "heatmap_loss" | "rerandomization" |
              "movement_scatter" | "stability_depth": {"file": name in
              analysis/, "width": px, "height": px}}
}
The experiment's arms (`conformer_fl.experiment.arms`) read each droppable
module's label and wer_increase (names match `list_units` at "granularity",
which must be "module") and turn them into federated-dropout rates.
"""

from conformer_fl.analysis.importance import run_analysis
from conformer_fl.analysis.importance_file import Importance

__all__ = ["Importance", "run_analysis"]
