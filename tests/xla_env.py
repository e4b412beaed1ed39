"""The environment of a test's subprocess: this session's, with D CPU devices.

tests/conftest.py sets XLA_FLAGS for the whole session (device count and
compile-speed flags); a subprocess that needs another device count replaces
only that flag and keeps the others.
"""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices: int, flags: str | None = None) -> str:
  """`flags` (default: this process's XLA_FLAGS) with D CPU devices."""
  if flags is None:
    flags = os.environ.get("XLA_FLAGS", "")
  kept = [f for f in flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={devices}"])


def subprocess_env(devices: int, **extra: str) -> dict[str, str]:
  """A copy of os.environ with D CPU devices and `extra` variables."""
  env = dict(os.environ, **extra)
  env["XLA_FLAGS"] = xla_flags(devices)
  return env
