"""Unit selections: glob patterns over '/'-joined unit names, one config line.

The config fields that select units of the model (`central.frozen_units`,
the keys of `federated.dropout.rates`, `federated.dropout.freeze_units`;
conformer_fl/config_lib.py documents them) hold `fnmatch` patterns over unit
names such as 'encoder/block_03/conv' (`models.list_units`):

  * A pattern selects a name when it matches the whole name or one of its
    '/'-prefixes, case-sensitively (`fnmatch.fnmatchcase`; `*` also matches
    '/'). An exact name selects itself; a block 'encoder/block_03' selects
    the units inside it; 'encoder/block_0[01]/*' the modules of blocks 0
    and 1; '*/conv' every conv module.
  * A pattern that selects no name is an error naming the config field, the
    pattern and the names there are.
  * Several patterns of a {pattern: value} mapping may select one name
    (`assign_to_units`): the MOST SPECIFIC wins, i.e. the pattern that
    selects the fewest names (so 'encoder/block_03/ffn1' beats
    'encoder/block_03' and '*/ffn1'); the order of the patterns plays no
    part. Two patterns selecting equally many names, one of them in common,
    with different values are an error.

This module knows no model: conformer_fl/optimizers.py and
conformer_fl/federated/dropout.py both hand it the names to select from.
"""

from collections.abc import Iterable, Mapping, Sequence
import fnmatch
from typing import TypeVar

Value = TypeVar("Value")

# Names listed in an error message at most (the rest are counted).
_MAX_LISTED = 60


def _prefixes(name: str) -> list[str]:
  """'a/b/c' -> ['a', 'a/b', 'a/b/c']."""
  parts = name.split("/")
  return ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]


def selects(pattern: str, name: str) -> bool:
  """Whether `pattern` matches `name` or one of its '/'-prefixes."""
  return any(fnmatch.fnmatchcase(prefix, pattern)
             for prefix in _prefixes(name))


def _listed(names: Sequence[str]) -> str:
  shown = ", ".join(repr(name) for name in names[:_MAX_LISTED])
  more = len(names) - _MAX_LISTED
  return f'[{shown}{f", ... and {more} more" if more > 0 else ""}]'


def _check_patterns(patterns: Iterable[str], field: str) -> list[str]:
  if isinstance(patterns, str):
    raise ValueError(f"{field}: expected a sequence of unit patterns, got the "
                     f"string {patterns!r}; write ({patterns!r},).")
  patterns = list(patterns)
  for pattern in patterns:
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"{field}: unit patterns are non-empty strings, got "
                       f"{pattern!r}.")
  return patterns


def match_units(patterns: Iterable[str], names: Sequence[str], *,
                field: str, allow_unmatched: bool = False
                ) -> dict[str, list[str]]:
  """{pattern: the names it selects, in the order of `names`}.

  Args:
    patterns: fnmatch patterns (module docstring), e.g. ('*/conv',).
    names: the names to select from, e.g. `models.list_units(params,
      'module')`'s keys.
    field: the config field the patterns come from, for error messages.
    allow_unmatched: keep a pattern that selects nothing (an empty list)
      instead of raising.

  Raises:
    ValueError: a pattern that is no non-empty string, `patterns` given as
      one string, or (unless allow_unmatched) a pattern that selects no name;
      the message names the field, the pattern and the names.
  """
  matched = {}
  for pattern in _check_patterns(patterns, field):
    selected = [name for name in names if selects(pattern, name)]
    if not selected and not allow_unmatched:
      raise ValueError(f"{field}: pattern {pattern!r} matches no unit; the "
                       f"units are {_listed(list(names))}.")
    matched[pattern] = selected
  return matched


def select_units(patterns: Iterable[str], names: Sequence[str], *,
                 field: str) -> list[str]:
  """The names that some pattern selects, in the order of `names`.

  Raises:
    ValueError: as `match_units` (a pattern that selects no name).
  """
  chosen = set()
  for selected in match_units(patterns, names, field=field).values():
    chosen.update(selected)
  return [name for name in names if name in chosen]


def assign_to_units(values: Mapping[str, Value], names: Sequence[str], *,
                    field: str) -> dict[str, Value]:
  """{name: value of the most specific pattern selecting it}, names in order.

  Names no pattern selects are left out; a pattern that selects none of
  `names` assigns nothing (`match_units` checks patterns against the names
  they must match, when those differ from `names`).

  Args:
    values: {pattern: value}, e.g. {'*/conv': 0.5}.
    names: the names to assign to.
    field: the config field, for error messages.

  Raises:
    ValueError: a bad pattern (`match_units`), or two equally specific
      patterns that select one name with different values.
  """
  matched = match_units(values, names, field=field, allow_unmatched=True)
  assigned = {}
  for name in names:
    candidates = [pattern for pattern, selected in matched.items()
                  if name in selected]
    if not candidates:
      continue
    fewest = min(len(matched[pattern]) for pattern in candidates)
    winners = [pattern for pattern in candidates
               if len(matched[pattern]) == fewest]
    if len({repr(values[pattern]) for pattern in winners}) > 1:
      raise ValueError(
          f"{field}: patterns {winners} each select {fewest} unit(s), "
          f"{name!r} among them, with different values "
          f"{[values[pattern] for pattern in winners]}; make one more "
          "specific.")
    assigned[name] = values[winners[0]]
  return assigned
