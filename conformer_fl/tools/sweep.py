r"""Sweeps: one experiment config over a grid of its arguments.

A sweep file `configs/sweeps/NAME.py` has `get_config(arg=None)` returning a
ConfigDict with the fields:
  base.config   the config file of every point, relative to the repository
                root, e.g. 'configs/central.py'.
  base.arg      its argument, e.g. 'size=demo,corpus=demo,steps=1200'.
  axes          the grid, in order: ((key, (value, ...)), ...). A key is an
                argument of base.config ('seed', 'norm', 'size', ...), or
                'config.FIELD' for a field override (e.g.
                'config.federated.dropout.default_rate').
  overrides     ('FIELD=VALUE', ...): `--config.FIELD=VALUE` on every point.
  analysis.config, analysis.arg, analysis.overrides: the analysis pass run on
                every point's workdir (`launch/sweep.py --analysis`).
(The axes are a tuple of pairs, not a ConfigDict: a ConfigDict sorts its keys.)

The points are the product of the axes, the last axis varying fastest. A point
is named by its axis values, `seed=0,norm=group_norm`, and its workdir is
ROOT/<dirname> with a directory-safe name, `seed0_norm-group_norm`: key and
value joined directly for numbers, by '-' otherwise; points joined by '_';
characters other than letters, digits and ._- become '-'.

  sweep = load_config_file('configs/sweeps/stability.py:sizes=tiny')
  for point in expand(sweep):
    args = main_args(sweep, point, point_workdir(ROOT, point))
    # python -m conformer_fl.main *args

`launch/sweep.py` runs the points (locally or on a TPU pod) and the analysis.
"""

from collections.abc import Sequence
import dataclasses
import importlib.util
import itertools
import os
import re

import ml_collections

ANALYSIS_CONFIG = "configs/analysis.py"
_ARG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
FIELD_PREFIX = "config."

Scalar = bool | int | float | str


@dataclasses.dataclass(frozen=True)
class Point:
  """One point of a sweep.

  Attributes:
    values: ((axis key, value), ...) in axis order.
    name: 'seed=0,norm=group_norm'.
    dirname: 'seed0_norm-group_norm' (directory-safe, unique in the sweep).
  """
  values: tuple[tuple[str, Scalar], ...]
  name: str
  dirname: str


def format_value(value: Scalar) -> str:
  """A value as written in a config argument or an override."""
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


def _dirname_part(key: str, value: Scalar) -> str:
  key = key[len(FIELD_PREFIX):] if key.startswith(FIELD_PREFIX) else key
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  part = f"{key}{value}" if is_number else f"{key}-{format_value(value)}"
  return _UNSAFE.sub("-", part)


def parse_arg_string(arg: str) -> dict[str, str]:
  """'a=1,b=x' -> {'a': '1', 'b': 'x'} (in order)."""
  parsed = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or not _ARG_KEY.match(key):
      raise ValueError(f"Bad config argument item {item!r} in {arg!r}: expected"
                       " key=value.")
    parsed[key] = value
  return parsed


def _check_override(override: str, where: str) -> tuple[str, str]:
  field, sep, value = override.partition("=")
  if not sep or not _FIELD.match(field):
    raise ValueError(f"Bad override {override!r} in {where}: expected"
                     " 'FIELD=VALUE' such as 'central.eval_every=200'.")
  return field, value


def validate_sweep(sweep: ml_collections.ConfigDict) -> None:
  """Checks the fields of a sweep config (module docstring).

  Raises:
    ValueError: naming the bad field.
  """
  for field in ("base", "axes"):
    if field not in sweep:
      raise ValueError(f"A sweep config needs the field {field!r}.")
  if not sweep.base.get("config"):
    raise ValueError("sweep.base.config must name a config file, e.g."
                     " 'configs/central.py'.")
  parse_arg_string(sweep.base.get("arg", ""))
  if not sweep.axes:
    raise ValueError("sweep.axes is empty: give at least one (key, values).")
  keys = []
  for axis in sweep.axes:
    if len(axis) != 2 or not isinstance(axis[1], (tuple, list)):
      raise ValueError(f"Bad axis {axis!r}: expected (key, (value, ...)).")
    key, values = axis
    field = key[len(FIELD_PREFIX):] if key.startswith(FIELD_PREFIX) else None
    if not (_FIELD.match(field) if field is not None else _ARG_KEY.match(key)):
      raise ValueError(f"Bad axis key {key!r}: a config argument (e.g. 'seed')"
                       " or 'config.FIELD' (e.g. 'config.central.num_steps').")
    if not values:
      raise ValueError(f"Axis {key!r} has no values.")
    if len(set(map(repr, values))) != len(values):
      raise ValueError(f"Axis {key!r} repeats a value: {tuple(values)}.")
    for value in values:
      if not isinstance(value, (bool, int, float, str)):
        raise ValueError(f"Axis {key!r}: values must be numbers, strings or"
                         f" booleans, got {value!r}.")
      if field is None and re.search(r"[,:=]", format_value(value)):
        raise ValueError(f"Axis {key!r}: the value {value!r} cannot go in a"
                         " config argument (it contains , : or =).")
    keys.append(key)
  if len(set(keys)) != len(keys):
    raise ValueError(f"Repeated axis keys: {keys}.")
  for override in sweep.get("overrides", ()):
    _check_override(override, "sweep.overrides")
  analysis = sweep.get("analysis")
  if analysis is not None:
    parse_arg_string(analysis.get("arg", ""))
    for override in analysis.get("overrides", ()):
      _check_override(override, "sweep.analysis.overrides")


def expand(sweep: ml_collections.ConfigDict) -> list[Point]:
  """The points of the sweep, the last axis varying fastest.

  Raises:
    ValueError: a bad sweep config, or two points with the same dirname.
  """
  validate_sweep(sweep)
  keys = [key for key, _ in sweep.axes]
  points = []
  for combination in itertools.product(*(values for _, values in sweep.axes)):
    values = tuple(zip(keys, combination))
    points.append(Point(
        values=values,
        name=",".join(f"{k}={format_value(v)}" for k, v in values),
        dirname="_".join(_dirname_part(k, v) for k, v in values)))
  dirnames = [p.dirname for p in points]
  if len(set(dirnames)) != len(dirnames):
    raise ValueError(f"Two points share a directory name: {dirnames}.")
  return points


def config_arg(sweep: ml_collections.ConfigDict, point: Point) -> str:
  """base.arg with the point's argument values (replaced in place or added)."""
  arg = parse_arg_string(sweep.base.get("arg", ""))
  for key, value in point.values:
    if not key.startswith(FIELD_PREFIX):
      arg[key] = format_value(value)
  return ",".join(f"{k}={v}" for k, v in arg.items())


def _config_flag(config_file: str, arg: str) -> str:
  return f"--config={config_file}:{arg}" if arg else f"--config={config_file}"


def point_workdir(root: str, point: Point) -> str:
  """ROOT/<dirname>, for a local path or a gs:// URL."""
  if not root:
    raise ValueError("The sweep needs a workdir root.")
  return f"{root.rstrip('/')}/{point.dirname}"


def main_args(sweep: ml_collections.ConfigDict, point: Point, workdir: str,
              extra: Sequence[str] = ()) -> list[str]:
  """Arguments of `python -m conformer_fl.main` for one point.

  Order: --config, --workdir, the sweep's overrides, the point's field
  overrides, then `extra` (e.g. --config.data.data_dir=... of the host that
  runs it).
  """
  args = [_config_flag(sweep.base.config, config_arg(sweep, point)),
          f"--workdir={workdir}"]
  args += [f"--{FIELD_PREFIX}{o}" for o in sweep.get("overrides", ())]
  args += [f"--{key}={format_value(value)}" for key, value in point.values
           if key.startswith(FIELD_PREFIX)]
  return args + list(extra)


def analysis_args(sweep: ml_collections.ConfigDict, workdir: str,
                  compare_workdirs: Sequence[str] = ()) -> list[str]:
  """Arguments of the analysis pass over `workdir`.

  With compare_workdirs, the pass also compares the importance of this run
  with theirs (their analysis/importance.json must exist) and writes it under
  "stability" in workdir/analysis/importance.json (and report.md,
  stability_depth.png).
  """
  analysis = sweep.get("analysis") or ml_collections.ConfigDict()
  args = [_config_flag(analysis.get("config", ANALYSIS_CONFIG),
                       analysis.get("arg", "")),
          f"--workdir={workdir}"]
  args += [f"--{FIELD_PREFIX}{o}" for o in analysis.get("overrides", ())]
  if compare_workdirs:
    args.append(f"--config.analysis.compare_workdirs="
                f"{tuple(str(w) for w in compare_workdirs)!r}")
  return args


# ----------------------------------------------------------------------------
# Loading and checking config files.


def load_config_file(spec: str, root: str = ".") -> ml_collections.ConfigDict:
  """`get_config(arg)` of 'PATH.py[:ARG]' (PATH: from the cwd, else `root`).

  Raises:
    FileNotFoundError: no such file. ValueError: no get_config.
  """
  path, _, arg = spec.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(root, path)):
    path = os.path.join(root, path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config file {path!r} (from {spec!r}).")
  name = "_sweep_config_" + re.sub(r"\W", "_", os.path.abspath(path))
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} has no get_config().")
  return module.get_config(arg) if arg else module.get_config()


def _has_field(config: ml_collections.ConfigDict, field: str) -> bool:
  node = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def check_points(sweep: ml_collections.ConfigDict, points: Sequence[Point],
                 root: str = ".", extra: Sequence[str] = ()) -> None:
  """Builds every point's config, so that a bad argument fails before any run.

  Raises:
    ValueError: an argument the config does not take, or an override of a
      field it does not have (naming the point).
  """
  for point in points:
    arg = config_arg(sweep, point)
    try:
      config = load_config_file(f"{sweep.base.config}:{arg}" if arg
                                else sweep.base.config, root)
    except ValueError as e:
      raise ValueError(f"Sweep point {point.name}: {e}") from e
    flags = main_args(sweep, point, "unused", extra)[2:]
    for flag in flags:
      if not flag.startswith(f"--{FIELD_PREFIX}"):
        raise ValueError(f"Sweep point {point.name}: unexpected argument"
                         f" {flag!r} (expected --config.FIELD=VALUE).")
      field, _ = _check_override(flag[len(f"--{FIELD_PREFIX}"):], point.name)
      if not _has_field(config, field):
        raise ValueError(f"Sweep point {point.name}: {sweep.base.config} has"
                         f" no field {field!r} (from {flag!r}).")


def sweep_name(spec: str) -> str:
  """'configs/sweeps/stability.py:seeds=2' -> 'stability'."""
  return os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
