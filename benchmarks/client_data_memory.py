r"""Peak host memory of a federated run against the size of its corpus.

Builds the LibriSpeech stand-in (`conformer_fl.data.librispeech_stand_in`:
LibriSpeech's TFDS schema, integer speaker ids, utterances of 4-24 s) at each
scale (scale x `--speakers` train speakers of `--utterances` utterances each),
then runs a short federated training on it,
`configs/federated.py:size=tiny,corpus=librispeech,domain=all` (a few rounds,
a tiny model, one 24 s bucket), each run in its own process, and reads that
process's peak resident set size from `os.wait4` (ru_maxrss, the kernel's
high-water mark of the child). The corpus grows 8x between the scales; a path
that streams the clients' records from disk keeps the peak flat, one that
holds every client's examples in memory grows by the int16 audio it holds.

`--code` selects the repository whose `conformer_fl` the runs import (the
stand-in is always built with this repository's code): pass another checkout
to measure its path on the same data, e.g. one that reads tfrecord files only:
  python benchmarks/client_data_memory.py --out=/tmp/cfl_mem
  python benchmarks/client_data_memory.py --out=/tmp/cfl_mem_other \
      --file_format=tfrecord --code=/path/to/other/checkout

Prints a table (scale, utterances, hours, int16 audio in MB, peak RSS in MB,
growth against the first scale) and the JSON of the results.

Flags are absl flags (`--help` lists them); a bad one ends the run with one
line `error: ...`, exit status 1.
"""

import json
import os
import subprocess
import sys
import time

from absl import flags

from conformer_fl import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags(flag_values: flags.FlagValues) -> None:
  """The benchmark's flags (absl)."""
  f = flag_values
  flags.DEFINE_string("out", None,
                      "Folder for the stand-in corpora and run workdirs.",
                      flag_values=f)
  flags.DEFINE_list("scales", "1,8",
                    "Comma-separated corpus sizes, in units of the first.",
                    flag_values=f)
  flags.DEFINE_integer("speakers", 24, "Train speakers at scale 1.",
                       flag_values=f)
  flags.DEFINE_integer("utterances", 6, "Utterances per train speaker.",
                       flag_values=f)
  flags.DEFINE_integer("rounds", 3, "Federated rounds of each run.",
                       flag_values=f)
  flags.DEFINE_enum("file_format", "array_record", ["array_record", "tfrecord"],
                    "File format of the stand-in corpus.", flag_values=f)
  flags.DEFINE_string("code", ROOT,
                      "Repository root whose conformer_fl the runs use.",
                      flag_values=f)
  flags.DEFINE_bool("build_only", False,
                    "(internal) build one stand-in and exit.", flag_values=f)
  flags.DEFINE_integer("scale", 1, "(internal) the scale of --build_only.",
                       flag_values=f)
  flags.mark_flag_as_required("out", flag_values=f)


def stand_in_size(args, scale: int):
  from conformer_fl.data import librispeech_stand_in  # pylint: disable=g-import-not-at-top
  return librispeech_stand_in.StandInSize(
      train_speakers=args.speakers * scale,
      utterances_per_speaker=args.utterances, eval_speakers=2,
      eval_utterances_per_speaker=2, min_seconds=4.0, max_seconds=24.0,
      seed=0)


def data_dir_of(args, scale: int) -> str:
  return os.path.join(args.out, f"librispeech_{args.file_format}_x{scale}")


def build_stand_in(args) -> dict[str, float]:
  """(--build_only) Builds one scale's stand-in; returns its train size."""
  from conformer_fl.data import librispeech_stand_in  # pylint: disable=g-import-not-at-top
  size = stand_in_size(args, args.scale)
  builder = librispeech_stand_in.build(data_dir_of(args, args.scale), size,
                                       args.file_format)
  del builder
  lengths = [n for split in librispeech_stand_in.TRAIN_SPLITS
             for n in librispeech_stand_in.num_samples_of(size, split)]
  return {"utterances": len(lengths), "hours": sum(lengths) / 16000 / 3600,
          "audio_mb": sum(lengths) * 2 / 1e6}


def _env(pythonpath: str) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = pythonpath
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("CUDA_VISIBLE_DEVICES", "")
  return env


def run_federated(args, scale: int) -> dict[str, float]:
  """Runs the federated training in a child process; its peak RSS and time."""
  workdir = os.path.join(args.out, f"run_{args.file_format}_x{scale}")
  subprocess.run(["rm", "-rf", workdir], check=True)
  command = [
      sys.executable, "-m", "conformer_fl.main",
      "--config=" + os.path.join(
          args.code, "configs/federated.py:size=tiny,corpus=librispeech,"
          f"domain=all,rounds={args.rounds}"),
      f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir_of(args, scale)}",
      "--config.data.tokenizer.kind=char",
      "--config.data.labels_per_second=24.0",
      "--config.data.bucket_seconds=(24.0,)",
      "--config.data.eval_batch_size=2",
      "--config.eval_max_batches=1",
      "--config.federated.clients_per_round=2",
      "--config.federated.local_steps=1",
      "--config.federated.client_batch_size=2",
      f"--config.federated.eval_every={args.rounds}",
      f"--config.federated.checkpoint_every={args.rounds}",
  ]
  start = time.perf_counter()
  child = subprocess.Popen(command, cwd=args.code, env=_env(args.code),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  output = child.stdout.read()  # Until the child closes it (exits).
  # wait4, not Popen.wait: it returns the child's resource usage, whose
  # ru_maxrss (KiB on Linux) is the child's own peak resident set size.
  _, status, usage = os.wait4(child.pid, 0)
  child.returncode = os.waitstatus_to_exitcode(status)
  child.stdout.close()
  seconds = time.perf_counter() - start
  if child.returncode != 0:
    raise RuntimeError(f"The run at scale {scale} failed:\n{output[-4000:]}")
  return {"peak_rss_mb": usage.ru_maxrss / 1024, "run_seconds": seconds}


def main(command_line: cli.ScriptArgs) -> None:
  args = command_line.flags
  if args.build_only:
    print("RESULT " + json.dumps(build_stand_in(args)))
    return
  os.makedirs(args.out, exist_ok=True)
  results = []
  for scale in (int(s) for s in args.scales):
    build = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--out={args.out}",
         f"--speakers={args.speakers}", f"--utterances={args.utterances}",
         f"--file_format={args.file_format}", "--build_only",
         f"--scale={scale}"],
        env=_env(ROOT), capture_output=True, text=True, check=False)
    if build.returncode:
      raise RuntimeError(f"Building scale {scale} failed:\n"
                         f"{build.stdout[-2000:]}{build.stderr[-4000:]}")
    line = [l for l in build.stdout.splitlines() if l.startswith("RESULT ")][-1]
    result = {"scale": scale, **json.loads(line[len("RESULT "):])}
    result.update(run_federated(args, scale))
    results.append(result)
    print(json.dumps(result), flush=True)
  first = results[0]["peak_rss_mb"]
  print(f"\nFederated run (tiny model, {args.rounds} rounds) on the LibriSpeech"
        f" stand-in ({args.file_format}), code {args.code}\n")
  print("| scale | train utterances | hours | int16 audio MB | peak RSS MB |"
        " growth |")
  print("|---:|---:|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['scale']}x | {r['utterances']} | {r['hours']:.2f} |"
          f" {r['audio_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
          f" {100 * (r['peak_rss_mb'] / first - 1):+.1f}% |")
  print("\n" + json.dumps(results))


if __name__ == "__main__":
  cli.run_script(main, define_flags)
