"""The number of examples per federated client: a table and a histogram."""

from collections.abc import Mapping, Sequence
import io
import os

from etils import epath
import numpy as np


def client_size_report(
    client_sizes: Mapping[str, int] | Sequence[int],
    out_dir: str | os.PathLike[str],
) -> tuple[str, str]:
  """Markdown table and histogram PNG of the number of examples per client.

  Args:
    client_sizes: examples per client (a client id -> count mapping or counts).
    out_dir: where `client_sizes.png` is written (created if needed); local or
      remote (`gs://...`), written through `etils.epath`.

  Returns:
    (markdown table with clients, examples, min, median, mean, max; PNG path).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  sizes = np.asarray(list(client_sizes.values()) if isinstance(client_sizes, Mapping)
                     else list(client_sizes), dtype=np.int64)
  if sizes.size == 0:
    raise ValueError("client_size_report needs at least one client.")
  table = "\n".join([
      "| clients | examples | min | median | mean | max |",
      "|---:|---:|---:|---:|---:|---:|",
      f"| {sizes.size} | {int(sizes.sum())} | {int(sizes.min())} |"
      f" {float(np.median(sizes)):.1f} | {float(sizes.mean()):.1f} |"
      f" {int(sizes.max())} |",
  ])
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  png_path = out_dir / "client_sizes.png"
  fig, ax = plt.subplots(figsize=(5, 3.2))
  bins = np.arange(sizes.min(), sizes.max() + 2) - 0.5
  if bins.size > 41:
    bins = 40
  ax.hist(sizes, bins=bins, color="tab:blue", edgecolor="white")
  ax.set_xlabel("examples per client")
  ax.set_ylabel("clients")
  ax.set_title(f"{sizes.size} clients, {int(sizes.sum())} examples")
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  png_path.write_bytes(png.getvalue())
  return table, os.fspath(png_path)
