"""The experiment's figures, drawn from W/summary.json.

  wer_vs_cost.png     test WER of every arm at every cost level, with its
                      interval, against the client's trainable parameters
                      (left) and its measured step time (right), both as a
                      fraction of the full model's;
  wer_by_round.png    dev WER by round of every arm (model 0, first seed):
                      the plateau of the full arm;
  pretrain_curve.png  pre-training dev WER against step, one line per model.
"""

from collections.abc import Mapping
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from conformer_fl.analysis import plots  # pylint: disable=g-import-not-at-top,wrong-import-position

COST_FIGURE = "wer_vs_cost.png"
ROUNDS_FIGURE = "wer_by_round.png"
CURVE_FIGURE = "pretrain_curve.png"

_MARKERS = {"full": "*", "targeted": "o", "anti_targeted": "v",
            "uniform": "s", "targeted_rescaled": "D", "freeze": "X",
            "uniform_ordered": "<", "uniform_static": ">",
            "uniform_rolling": "^"}


def _base(arm: str) -> str:
  return "random" if arm.startswith("random_") else arm


def plot_wer_vs_cost(summary: Mapping[str, Any],
                     path: str | os.PathLike[str]) -> None:
  """WER (interval bars) against client parameters and step time, per arm."""
  fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.2), sharey=True)
  colors = {}
  for ax, key, label in (
      (axes[0], "params_fraction", "client trainable parameters / full"),
      (axes[1], "step_seconds_fraction", "measured client step time / full")):
    for row in summary["arms"]:
      x = row.get(key)
      if x is None:
        continue
      base = _base(row["arm"])
      color = colors.setdefault(base, f"C{len(colors)}")
      ax.errorbar([x], [row["wer"]],
                  yerr=[[row["wer"] - row["low"]], [row["high"] - row["wer"]]],
                  fmt=_MARKERS.get(base, "P"), color=color, capsize=3,
                  label=base)
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  axes[0].legend(unique.values(), unique.keys(), fontsize=8)
  axes[0].set_ylabel(f"WER ({summary['setup']['eval_split']}),"
                     f" {100 * summary['setup']['confidence']:.0f}% interval")
  fig.suptitle("Client cost against WER, every arm and cost level")
  fig.tight_layout()
  plots.save_png(fig, path)


def plot_wer_by_round(summary: Mapping[str, Any],
                      path: str | os.PathLike[str]) -> None:
  """Dev WER of each arm against the round (model 0, its first seed)."""
  fig, ax = plt.subplots(figsize=(6.5, 4.0))
  for row in summary["arms"]:
    if row["dev_wer_by_round"]:
      x, y = zip(*row["dev_wer_by_round"])
      ax.plot(x, y, marker=_MARKERS.get(_base(row["arm"]), "P"),
              label=row["key"], linewidth=2.5 if row["arm"] == "full" else 1)
  ax.set_xlabel("round")
  ax.set_ylabel("WER on the dev split (held-out speakers)")
  ax.set_title("Federated adaptation: dev WER by round")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  plots.save_png(fig, path)


def plot_learning_curve(summary: Mapping[str, Any],
                        path: str | os.PathLike[str]) -> None:
  """Pre-training dev WER against step, one line per pre-trained model."""
  fig, ax = plt.subplots(figsize=(6.0, 3.8))
  for m, model in enumerate(summary["models"]):
    curve = model["learning_curve"]
    if curve:
      ax.plot([c["step"] for c in curve], [c["wer"] for c in curve],
              marker="o", label=f"model {m} (seed {model['seed']}) WER")
  ax.set_xlabel("step")
  ax.set_ylabel("dev WER, own domain")
  ax.set_title("Central pre-training")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  plots.save_png(fig, path)


def write_figures(summary: Mapping[str, Any], workdir: Any) -> None:
  """Writes the three figures into `workdir`."""
  plot_wer_vs_cost(summary, os.path.join(workdir, COST_FIGURE))
  plot_wer_by_round(summary, os.path.join(workdir, ROUNDS_FIGURE))
  plot_learning_curve(summary, os.path.join(workdir, CURVE_FIGURE))
