"""The config that `python -m conformer_fl.main` would run, for tests."""

from absl import flags
import ml_collections
from ml_collections import config_flags


def parse_config(config: str, *overrides: str) -> ml_collections.ConfigDict:
  """`--config=CONFIG` and `--config.FIELD=VALUE` overrides, parsed as main.py does."""
  argv = ["main", f"--config={config}", *overrides]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "",
                                           flag_values=flag_values,
                                           lock_config=True, sys_argv=argv)
  flag_values(argv)
  return holder.value
