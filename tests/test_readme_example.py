"""The README's example of importing the Conformer into another JAX project runs.

The example is the ```python block right after the line MARKER in README.md. It
is executed as it stands, and every `print(...)  # expected` line of it must
print exactly what its comment says.
"""

import contextlib
import io
import math
import pathlib

import jax
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- test: import-example -->"


def extract_block(markdown: str, marker: str = MARKER) -> str:
  """The code of the ```python block that follows the line `marker`.

  Blank lines may separate the marker from the block.

  Raises:
    ValueError: the marker is missing or repeated, or no ```python block
      follows it, or the block is not closed.
  """
  lines = markdown.splitlines()
  found = [i for i, line in enumerate(lines) if line.strip() == marker]
  if len(found) != 1:
    raise ValueError(f"Expected the line {marker!r} once, found it "
                     f"{len(found)} times.")
  start = found[0] + 1
  while start < len(lines) and not lines[start].strip():
    start += 1
  if start == len(lines) or lines[start].strip() != "```python":
    raise ValueError(f"No ```python block right after {marker!r}.")
  for end in range(start + 1, len(lines)):
    if lines[end].strip() == "```":
      return "\n".join(lines[start + 1:end]) + "\n"
  raise ValueError(f"The ```python block after {marker!r} is not closed.")


def expected_prints(code: str) -> list[str]:
  """The comments of one-line `print(...)  # expected` statements, in order."""
  return [line.split("  # ", 1)[1].strip() for line in code.splitlines()
          if line.startswith("print(") and "  # " in line]


def test_extract_block_finds_the_block_after_the_marker():
  markdown = "\n".join([
      "```python", "not_this = 1", "```", MARKER, "", "```python",
      "x = 1", "print(x)  # 1", "```", "```python", "nor_this = 2", "```"])
  code = extract_block(markdown)
  assert code == "x = 1\nprint(x)  # 1\n"
  assert expected_prints(code) == ["1"]


@pytest.mark.parametrize("markdown,message", [
    ("no marker here", "found it 0 times"),
    (f"{MARKER}\n```python\n```\n{MARKER}\n```python\n```", "found it 2 times"),
    (f"{MARKER}\ntext\n```python\nx = 1\n```", "No ```python block"),
    (f"{MARKER}\n```sh\nls\n```", "No ```python block"),
    (f"{MARKER}\n```python\nx = 1\n", "is not closed"),
])
def test_extract_block_names_the_problem(markdown, message):
  with pytest.raises(ValueError, match=None) as error:
    extract_block(markdown)
  assert message in str(error.value)


def test_readme_import_example_runs():
  code = extract_block(README.read_text())
  namespace = {"__name__": "readme_example"}
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    exec(compile(code, f"{README}:import-example", "exec"), namespace)  # pylint: disable=exec-used

  # Every commented print says what the snippet really prints.
  expected = expected_prints(code)
  assert expected, "the example has no `print(...)  # expected` lines"
  assert stdout.getvalue().splitlines() == expected

  # 2 utterances of 1 s: 98 log-mel frames, 25 after 4x subsampling.
  out = namespace["out"]
  vocab = namespace["config"].vocab_size
  assert out["logits"].shape == (2, 25, vocab)
  assert namespace["ids"].shape == namespace["id_paddings"].shape == (2, 25)
  loss = float(namespace["loss"])
  assert math.isfinite(loss) and loss > 0
  params = namespace["variables"]["params"]
  grads = namespace["grads"]
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))
