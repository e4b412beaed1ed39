r"""Runs one config as N local processes on 127.0.0.1, as a pod runs one per host.

Each process gets `--xla_force_host_platform_device_count=D` CPU devices, joins the
others through `jax.distributed.initialize` (gloo CPU collectives), and runs the
same entry point with the same config, so the `clients` mesh axis spans N x D
devices exactly as it spans the hosts of a TPU pod.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \
      --config=configs/federated.py:size=tiny --workdir=/tmp/cfl_fed

Everything after `--` goes to `python -m conformer_fl.main`. The launcher waits for
every process, prefixes their output with the process index, and exits non-zero if
any process fails (the others are then stopped). Its own flags are absl flags
(`--help` lists them); a bad one ends it with one line `error: ...`, status 1.

`--process_env=INDEX:NAME=VALUE` (repeatable) sets an environment variable of one
process only, e.g. a compilation cache of its own:

  python launch/local_multiprocess.py \
      --process_env=1:JAX_COMPILATION_CACHE_DIR=/tmp/cache_p1 -- ...

Processes may reach a compiled program far apart (one compiles it, another reads
it from the cache): each waits for the others after compiling, see
`conformer_fl/federated/mesh.py` (`barrier_after_compile`).
"""

from collections.abc import Mapping
import os
import socket
import subprocess
import sys
import threading

from absl import flags

from conformer_fl import cli


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _relay(prefix: str, stream, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"[{prefix}] {line}")
    out.flush()


def parse_process_env(items: list[str],
                      num_processes: int) -> dict[int, dict[str, str]]:
  """{process index: {name: value}} of `--process_env=INDEX:NAME=VALUE` items.

  Raises:
    ValueError: an item that is not INDEX:NAME=VALUE with 0 <= INDEX < N.
  """
  env: dict[int, dict[str, str]] = {}
  for item in items:
    index, _, assignment = item.partition(":")
    name, equals, value = assignment.partition("=")
    if (not index.isdigit() or int(index) >= num_processes or not equals
        or not name):
      raise ValueError(
          f"Bad --process_env {item!r}: expected INDEX:NAME=VALUE with INDEX"
          f" in [0, {num_processes}).")
    env.setdefault(int(index), {})[name] = value
  return env


def launch(
    main_args: list[str], num_processes: int, devices_per_process: int,
    process_env: Mapping[int, Mapping[str, str]] | None = None,
) -> int:
  """Starts the processes, waits for them and returns the first non-zero exit code."""
  port = _free_port()
  procs = []
  for index in range(num_processes):
    env = dict(os.environ)
    env.update((process_env or {}).get(index, {}))
    # Other XLA flags of the caller's (or this process's) environment are kept.
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        [*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["CONFORMER_FL_COORDINATOR"] = f"127.0.0.1:{port}"
    env["CONFORMER_FL_NUM_PROCESSES"] = str(num_processes)
    env["CONFORMER_FL_PROCESS_ID"] = str(index)
    proc = subprocess.Popen(
        [sys.executable, "-m", "conformer_fl.main", *main_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    thread = threading.Thread(
        target=_relay, args=(f"p{index}", proc.stdout, sys.stdout), daemon=True
    )
    thread.start()
    procs.append((proc, thread))
  exit_code = 0
  for proc, thread in procs:
    code = proc.wait()
    thread.join()
    if code and not exit_code:
      exit_code = code
      for other, _ in procs:
        if other.poll() is None:
          other.terminate()
  return exit_code


def define_flags(flag_values: flags.FlagValues) -> None:
  """The launcher's flags (absl)."""
  flags.DEFINE_integer("num_processes", 2, "Processes to start.",
                       flag_values=flag_values)
  flags.DEFINE_integer("devices_per_process", 2,
                       "CPU devices of each process.", flag_values=flag_values)
  flags.DEFINE_multi_string(
      "process_env", [], "INDEX:NAME=VALUE: an environment variable of"
      " process INDEX only.", flag_values=flag_values)


def main(args: cli.ScriptArgs) -> None:
  """Starts the processes of `args` and exits with `launch`'s code.

  Raises:
    ValueError: a flag out of range or a bad --process_env.
  """
  f = args.flags
  if f.num_processes < 1 or f.devices_per_process < 1:
    raise ValueError("--num_processes and --devices_per_process must be"
                     " positive.")
  process_env = parse_process_env(f.process_env, f.num_processes)
  sys.exit(launch(args.after_dashes, f.num_processes, f.devices_per_process,
                  process_env))


if __name__ == "__main__":
  cli.run_script(main, define_flags, errors=(ValueError,), after_dashes=True)
