"""One-line errors for the command-line entry points (absl flags).

`parse_flags` is the `flags_parser` of `absl.app.run` in `conformer_fl.main`,
`conformer_fl.tools.transcribe` and `conformer_fl.export`, and `run_script` runs the
scripts of launch/ and benchmarks/ the same way: a flag that cannot be
parsed (a mistyped `--config.FIELD`, a value of the wrong type, a config file
that does not exist, a bad `configs/NAME.py:ARG`, a missing required flag)
ends the program with one line `error: ...` on stderr naming the flag and the
fix, and exit status 1, before anything runs. `fail` does the same for errors
found later.

`--config=configs/NAME.py[:ARG]` names the file relative to the working
directory; where there is none (outside a checkout), the config of the
installed package is read (setup.py installs configs/ as conformer_fl/configs).
"""

from collections.abc import Callable, Sequence
import difflib
import os
import pathlib
import sys
from typing import NamedTuple, NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags


def one_line(text: str) -> str:
  """`text` with its whitespace (newlines included) collapsed to single spaces."""
  return " ".join(str(text).split())


def fail(message: str) -> NoReturn:
  """Ends the program: `error: MESSAGE` (one line) on stderr, exit status 1."""
  sys.exit(f"error: {one_line(message)}")


CONFIGS_PREFIX = "configs/"


def packaged_configs_dir() -> pathlib.Path:
  """The configs of the package: installed conformer_fl/configs, else the
  checkout's configs/ beside the package."""
  package = pathlib.Path(__file__).resolve().parent
  installed = package / "configs"
  return installed if installed.is_dir() else package.parent / "configs"


def resolve_config_path(path_and_arg: str) -> str:
  """`configs/NAME.py[:ARG]`, with the packaged file when cwd has none."""
  path, sep, arg = path_and_arg.partition(":")
  if os.path.exists(path) or not path.startswith(CONFIGS_PREFIX):
    return path_and_arg
  packaged = packaged_configs_dir() / path[len(CONFIGS_PREFIX):]
  return f"{packaged}{sep}{arg}" if packaged.is_file() else path_and_arg


def _config_file_arg(argv: Sequence[str], name: str) -> str | None:
  """The value of `--NAME=PATH[:ARG]` in argv, or None."""
  prefix = f"--{name}="
  for arg in argv:
    if arg.startswith(prefix):
      return arg[len(prefix):]
  return None


def load_config_file(path_and_arg: str) -> ml_collections.ConfigDict:
  """`configs/NAME.py[:ARG]` loaded as `--config` loads it (no overrides).

  Raises:
    OSError: no such file.
    ValueError, TypeError: the file's get_config rejects ARG.
  """
  flag_values = flags.FlagValues()
  argv = ["cli", f"--config={path_and_arg}"]
  holder = config_flags.DEFINE_config_file(
      "config", None, "", flag_values=flag_values, lock_config=False,
      sys_argv=argv)
  flag_values(argv)
  config = holder.value
  config.keys()  # A file that failed to load raises here.
  return config


def unknown_field_message(config: ml_collections.ConfigDict, flag_name: str,
                          path: str) -> str | None:
  """What is wrong with `--FLAG.PATH` when PATH is not a field of `config`.

  Returns None when every key of the dotted PATH exists.
  """
  node, walked = config, [flag_name]
  for key in path.split("."):
    if isinstance(node, (ml_collections.ConfigDict, dict)) and key in node:
      node = node[key]
      walked.append(key)
      continue
    parent = ".".join(walked)
    fields = (sorted(node.keys())
              if isinstance(node, (ml_collections.ConfigDict, dict)) else [])
    if not fields:
      return (f"--{flag_name}.{path}: {parent} is a value, not a group of"
              " fields; set it as a whole, e.g."
              f" --{parent}=VALUE.")
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if close:
      return (f"--{flag_name}.{path}: {parent} has no field {key!r}; did you"
              f" mean --{parent}.{close[0]}?")
    return (f"--{flag_name}.{path}: {parent} has no field {key!r}; its fields"
            f" are {', '.join(fields)}.")
  return None


def _override_error(argv: Sequence[str], config_flag_names: Sequence[str],
                    error: Exception) -> str:
  """The one-line message of an exception raised while parsing overrides."""
  for name in config_flag_names:
    path_and_arg = _config_file_arg(argv, name)
    if path_and_arg is None:
      continue
    try:
      config = load_config_file(path_and_arg)
    except (OSError, ValueError, TypeError) as e:
      return _config_file_error(name, path_and_arg, e)
    for arg in argv:
      flag = arg.lstrip("-").split("=", 1)[0]
      if flag.startswith(f"{name}."):
        message = unknown_field_message(config, name,
                                        flag[len(name) + 1:])
        if message:
          return message
  return one_line(f"{type(error).__name__}: {error}")


def _config_file_error(name: str, path_and_arg: str, error: Exception) -> str:
  """One line for a `--NAME=PATH[:ARG]` that did not load."""
  path = path_and_arg.split(":", 1)[0]
  if not os.path.isfile(path):
    return (f"--{name}={path_and_arg}: no such config file {path!r} (from"
            f" {os.getcwd()}); give a file of configs/, e.g."
            f" --{name}=configs/central.py.")
  # Errors of get_config arrive with the traceback in their text: its last
  # line is the exception and its message.
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  last = lines[-1] if lines else type(error).__name__
  last = last.split(": ", 1)[-1] if last.split(":")[0].endswith(
      ("Error", "Exception")) else last
  return f"--{name}={path_and_arg}: {last}"


def _flags_error(argv: Sequence[str], config_flag_names: Sequence[str],
                 error: flags.Error) -> str:
  """One line for an absl flags.Error (a flag that did not parse)."""
  text = str(error)
  for name in config_flag_names:
    path_and_arg = _config_file_arg(argv, name)
    if path_and_arg is not None and text.startswith(
        f"flag --{name}={path_and_arg}:"):
      return _config_file_error(name, path_and_arg, error)
  first, _, rest = text.partition("\n")
  if rest.strip():
    lines = [l.strip() for l in rest.splitlines() if l.strip()]
    return f"{first.rstrip(':')} {lines[-1]}"
  return f"{one_line(text)} (--helpshort lists the flags)"


def parse_flags(argv: Sequence[str],
                config_flag_names: Sequence[str] = ("config",),
                flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing, with one-line errors (module docstring).

  Args:
    argv: the command line, program name first.
    config_flag_names: the config_flags file flags among the program's flags;
      each is loaded here, so that a missing file is named now.
    flag_values: where the program's flags are defined (absl's FLAGS, or a
      FlagValues of a script parsed in another program's process).

  Returns:
    The arguments left after the flags, program name first.
  """
  argv = list(argv)
  for name in config_flag_names:
    prefix = f"--{name}="
    argv = [prefix + resolve_config_path(a[len(prefix):])
            if a.startswith(prefix) else a for a in argv]
  try:
    remaining = flag_values(argv)
  except flags.Error as e:
    fail(_flags_error(argv, config_flag_names, e))
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    # ml_collections raises these from a `--config.FIELD` override.
    fail(_override_error(argv, config_flag_names, e))
  for name in config_flag_names:
    path_and_arg = _config_file_arg(argv, name)
    if path_and_arg is None or name not in flag_values:
      continue
    try:
      flag_values[name].value.keys()
    except OSError as e:
      fail(_config_file_error(name, path_and_arg, e))
  return remaining


class ScriptArgs(NamedTuple):
  """A script's command line, parsed by `parse_script_flags`.

  Attributes:
    flags: the script's flags, parsed (attribute access: `args.flags.name`).
    positional: the arguments before `--` that are not flags.
    after_dashes: the arguments after the first `--`, untouched.
    argv: the command line without the program name, as given.
  """
  flags: flags.FlagValues
  positional: list[str]
  after_dashes: list[str]
  argv: list[str]


DefineFlags = Callable[[flags.FlagValues], None]


def parse_script_flags(
    argv: Sequence[str], define_flags: DefineFlags,
    flag_values: flags.FlagValues | None = None, *,
    config_flag_names: Sequence[str] = (), positional: bool = False,
    after_dashes: bool = False) -> ScriptArgs:
  """Defines a script's flags (`define_flags`) and parses `argv` into them.

  Args:
    argv: the command line, program name first.
    define_flags: adds the script's flags to the FlagValues it is given.
    flag_values: absl's FLAGS when the script runs as a program
      (`run_script`); None: a FlagValues of its own, for a caller in another
      program's process (tests), where absl's FLAGS holds that program's flags.
    config_flag_names: the script's config_flags file flags (`parse_flags`).
    positional: whether the script takes arguments that are not flags (else
      they are an error).
    after_dashes: whether the arguments after `--` are the script's to pass on
      (else `--` ends the flags and what follows is positional).

  Returns:
    The parsed command line. A flag that does not parse, or an argument the
    script does not take, ends the program with one line (`fail`).
  """
  argv = list(argv)
  flag_values = flags.FlagValues() if flag_values is None else flag_values
  define_flags(flag_values)
  own, rest = argv, []
  if after_dashes and "--" in argv:
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1:]
  remaining = parse_flags(own, config_flag_names, flag_values)[1:]
  if remaining and not positional:
    fail(f"unexpected arguments {remaining}: {os.path.basename(argv[0])}"
         " takes flags only (--help lists them)"
         + ("; arguments for the program it starts go after --"
            if after_dashes else ""))
  return ScriptArgs(flag_values, remaining, rest, argv[1:])


def run_script(main: Callable[[ScriptArgs], None], define_flags: DefineFlags,
               errors: tuple[type[Exception], ...] = (),
               **parse_options) -> None:
  """`absl.app.run(main)` of a script whose flags `define_flags` adds to
  absl's FLAGS, parsed by `parse_script_flags` (`parse_options`: its keyword
  arguments). A flag that does not parse, and an exception of `errors` that
  `main` raises, end the program with one line `error: ...`, exit status 1."""

  def main_with_one_line_errors(args: ScriptArgs) -> None:
    if not flags.FLAGS["verbosity"].present:
      # Warnings and errors only (absl.app turns on INFO): the script prints
      # what it has to say.
      logging.set_verbosity(logging.WARNING)
    try:
      main(args)
    except errors as e:
      fail(str(e))

  app.run(main_with_one_line_errors, flags_parser=lambda argv: (
      parse_script_flags(argv, define_flags, flags.FLAGS, **parse_options)))
