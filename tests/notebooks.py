"""Runs the notebooks of colabs/ in a fresh ipykernel and reads their outputs.

Used by tests/test_colabs.py and, for the notebook that reuses the tiny
experiment's workdir, tests/test_experiment_e2e.py (so that the experiment runs
once, on the worker that holds it).
"""

import base64
from collections.abc import Mapping
import json
import os
import pathlib
import sys

from jupyter_client import kernelspec
from jupyter_client import manager
import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
KERNEL_NAME = "conformer_fl_test"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def kernel_manager(kernel_dir: pathlib.Path,
                   python: str = sys.executable) -> manager.KernelManager:
  """A manager of ipykernels run by `python` (default: this interpreter)."""
  spec_dir = kernel_dir / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "conformer_fl test kernel",
      "language": "python",
  }))
  specs = kernelspec.KernelSpecManager(kernel_dirs=[str(kernel_dir)],
                                       ensure_native_kernel=False)
  return manager.KernelManager(kernel_name=KERNEL_NAME,
                               kernel_spec_manager=specs)


def execute(path: pathlib.Path, tmp_path: pathlib.Path,
            python: str = sys.executable, cwd: pathlib.Path = COLABS,
            base_env: Mapping[str, str] | None = None,
            **env: str) -> nbformat.NotebookNode:
  """Runs every cell of the notebook in colabs/; returns it with its outputs.

  Args:
    path: the notebook.
    tmp_path: a directory for the kernelspec.
    python: the interpreter that runs the kernel.
    cwd: the kernel's working directory.
    base_env: the kernel's environment before `env` (default: os.environ).
    **env: variables set on top of it (the notebooks' parameters).
  """
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, km=kernel_manager(tmp_path / "kernels", python), timeout=600,
      resources={"metadata": {"path": str(cwd)}})
  # Figures inline, as in Jupyter and Colab, whatever this process uses.
  base = os.environ if base_env is None else base_env
  client.execute(env={**base, **env,
                      "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
  return nb


def text(cell) -> str:
  """A code cell's stream and plain-text outputs, joined."""
  parts = []
  for output in cell.outputs:
    if output.output_type == "stream" and output.name == "stdout":
      parts.append(output.text)
    elif output.output_type in ("execute_result", "display_data"):
      parts.append(output.data.get("text/plain", ""))
  return "".join(parts)


def pngs(nb) -> list[bytes]:
  """The PNG images the notebook displayed, in order."""
  return [base64.b64decode(output.data["image/png"])
          for cell in nb.cells if cell.cell_type == "code"
          for output in cell.outputs
          if output.output_type in ("display_data", "execute_result")
          and "image/png" in output.data]


def cell_printing(nb, marker: str):
  """The one code cell whose output contains `marker`."""
  cells = [c for c in nb.cells if c.cell_type == "code" and marker in text(c)]
  assert len(cells) == 1, f"{len(cells)} cells print {marker!r}"
  return cells[0]


def all_text(nb) -> str:
  """The stream and plain-text outputs of every code cell, joined."""
  return "".join(text(c) for c in nb.cells if c.cell_type == "code")
