"""Figures of the importance analysis (matplotlib, Agg backend, fixed sizes).

Each function writes one PNG and returns its size in pixels (width, height),
which is `figure_size_inches(...) * DPI` exactly (no tight bounding box). The
PNG is rendered in memory and written through `etils.epath`, so `path` may be
local or remote (`gs://...`).
"""

from collections.abc import Mapping, Sequence
import io
import os
from typing import Any

from etils import epath
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

DPI = 100


def heatmap_size_inches(num_units: int, num_taus: int) -> tuple[float, float]:
  return (4.0 + 0.6 * num_taus, 1.5 + 0.35 * num_units)


def bars_size_inches(num_units: int) -> tuple[float, float]:
  return (4.0 + 0.45 * num_units, 4.5)


SCATTER_SIZE_INCHES = (4.5, 4.0)  # Per panel.
DEPTH_SIZE_INCHES = (6.0, 4.0)


def save_png(fig, path: str | os.PathLike[str]) -> tuple[int, int]:
  """Writes `fig` as a PNG to `path` (local or `gs://`); its size in pixels."""
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=DPI)
  width, height = fig.get_size_inches()
  plt.close(fig)
  epath.Path(path).write_bytes(png.getvalue())
  return int(round(width * DPI)), int(round(height * DPI))


def heatmap(values: np.ndarray, unit_names: Sequence[str], taus: Sequence[int],
            baseline: float, metric: str, step_key: str,
            path: str | os.PathLike[str]) -> tuple[int, int]:
  """Units x tau heatmap of a metric after re-initialization (Zhang et al.).

  Args:
    values: float [U, N] the metric with unit u reset to checkpoint taus[n].
    unit_names: U names (rows, in model order).
    taus: N checkpoint steps (columns).
    baseline: the unreset model's metric (in the title).
    metric: 'WER' or 'loss'.
    step_key: 'step' or 'round'.
    path: output PNG.
  """
  values = np.asarray(values, np.float64)
  fig, ax = plt.subplots(figsize=heatmap_size_inches(len(unit_names), len(taus)))
  image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
  ax.set_xticks(range(len(taus)), [str(t) for t in taus], rotation=90)
  ax.set_yticks(range(len(unit_names)), unit_names, fontsize=7)
  ax.set_xlabel(f"re-initialized to checkpoint tau ({step_key})")
  ax.set_title(f"{metric} after re-initialization (baseline {baseline:.3f})")
  if values.size and values.shape[0] * values.shape[1] <= 400:
    for (row, col), value in np.ndenumerate(values):
      ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
              color="w")
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  return save_png(fig, path)


def rerandomization_bars(wers: Mapping[str, Sequence[float]],
                         reinit_wers: Mapping[str, float], baseline: float,
                         path: str | os.PathLike[str]) -> tuple[int, int]:
  """Per unit: mean WER over re-randomization seeds (min-max whiskers).

  Args:
    wers: {unit: WER per seed}.
    reinit_wers: {unit: WER after the tau = 0 reset} (drawn beside).
    baseline: the unreset model's WER (a horizontal line).
    path: output PNG.
  """
  names = list(wers)
  fig, ax = plt.subplots(figsize=bars_size_inches(len(names)))
  x = np.arange(len(names))
  per_seed = [np.asarray(wers[n], np.float64) for n in names]
  means = np.array([v.mean() if v.size else np.nan for v in per_seed])
  lows = np.array([v.min() if v.size else np.nan for v in per_seed])
  highs = np.array([v.max() if v.size else np.nan for v in per_seed])
  ax.bar(x - 0.2, means, 0.4, yerr=[means - lows, highs - means],
         label="re-randomized (mean, min-max)", capsize=2)
  ax.bar(x + 0.2, [reinit_wers[n] for n in names], 0.4,
         label="re-initialized (tau = 0)")
  ax.axhline(baseline, color="k", linestyle="--", label="trained model")
  ax.set_xticks(x, names, rotation=90, fontsize=7)
  ax.set_ylabel("WER")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return save_png(fig, path)


def movement_scatter(panels: Sequence[tuple[str, Sequence[float | None]]],
                     wer_increase: Sequence[float], unit_names: Sequence[str],
                     path: str | os.PathLike[str]) -> tuple[int, int]:
  """One panel per movement measure: measure (x) vs WER increase (y) per unit.

  Args:
    panels: (measure name, value per unit or None) pairs.
    wer_increase: WER increase under the tau = 0 reset, per unit.
    unit_names: labels of the points.
    path: output PNG.
  """
  width, height = SCATTER_SIZE_INCHES
  fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height),
                           squeeze=False)
  for ax, (measure, xs) in zip(axes[0], panels):
    points = [(x, y, n) for x, y, n in zip(xs, wer_increase, unit_names)
              if x is not None and y is not None]
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=14)
    for x, y, name in points:
      ax.annotate(name.replace("encoder/", ""), (x, y), fontsize=5)
    ax.set_xlabel(measure)
    ax.set_ylabel("WER increase after reset to tau = 0")
  fig.tight_layout()
  return save_png(fig, path)


def depth_plot(profiles: Mapping[str, Mapping[str, Any]], key: str,
               path: str | os.PathLike[str]) -> tuple[int, int]:
  """Importance (`key` of each point) against relative depth, one series per run."""
  fig, ax = plt.subplots(figsize=DEPTH_SIZE_INCHES)
  for label, profile in profiles.items():
    points = sorted((p["relative_depth"], p[key]) for p in profile["points"]
                    if p[key] is not None)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
            markersize=3, label=label[-40:])
  ax.set_xlabel("relative depth (block index / number of blocks)")
  ax.set_ylabel(key.replace("_", " ") + " after reset to tau = 0")
  ax.legend(fontsize=6)
  fig.tight_layout()
  return save_png(fig, path)
