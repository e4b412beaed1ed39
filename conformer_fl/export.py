r"""Exports a trained run as a self-contained model (conformer_fl/exported.py).

  python -m conformer_fl.export --workdir=DIR --out=OUT [--step=N]

DIR is a central or federated run of `conformer_fl.main`; its latest
checkpoint (or step N) is written to OUT with its config and tokenizer, and a
model card. OUT must be new or empty; it is written whole or not at all (the
files go to a temporary folder beside it, renamed to OUT at the end). Errors
(no run, no checkpoint, OUT not empty) are one line `error: ...`, exit status 1.

model_card.json:
  {"format": 1,
   "source": {"workdir": str (absolute), "step_key": "step" | "round",
              "step": int, "mode": "central" | "federated"},
   "model": {"size fields" of config.model..., "num_params": int},
   "tokenizer": {"kind": str, "vocab_size": int},
   "audio": {"sample_rate": 16000, "channels": 1},
   "data": {"dataset": str, "builder_config": str, "eval_split": str,
            "eval_domains": [str] ([] = all)},
   "evaluations": [{"step": int, "wer", "cer", "wer_low", "wer_high"
                    (95% bootstrap interval), "loss", "num_examples"}, ...]
                  (every evaluation of the run's metrics.jsonl, in order, up
                  to the exported step),
   "wer": float | null (the evaluation at the exported step),
   "final_eval": {...} | null (the run's final_eval.json, if it has one),
   "versions": {"conformer_fl", "jax", "flax"}}
"""

from collections.abc import Sequence
import datetime
import json
import os
from typing import Any
import uuid

from absl import app
from absl import flags
from absl import logging
from etils import epath
import flax
import flax.serialization
import jax
import numpy as np

from conformer_fl import cli
from conformer_fl import exported
from conformer_fl import workdir as workdir_lib
from conformer_fl.data import batching
from conformer_fl.tools import transcribe

_EVAL_FIELDS = ("wer", "cer", "wer_low", "wer_high", "loss", "num_examples")


class ExportError(Exception):
  """The run cannot be exported (one line: the problem and the fix)."""


def evaluations(workdir: epath.Path, step_key: str,
                last_step: int) -> list[dict[str, Any]]:
  """The evaluation records of the run's metrics.jsonl up to `last_step`."""
  found = []
  for record in workdir_lib.Workdir(workdir).metrics():
    if "eval/wer" not in record or record.get(step_key, -1) > last_step:
      continue
    found.append({"step": record[step_key],
                  **{f: record.get(f"eval/{f}") for f in _EVAL_FIELDS}})
  return found


def model_card(workdir: epath.Path, config, variables: dict[str, Any],
               step: int) -> dict[str, Any]:
  """model_card.json (module docstring) of `workdir`'s checkpoint `step`."""
  step_key = "round" if config.get("mode") == "federated" else "step"
  evals = evaluations(workdir, step_key, step)
  at_step = [e for e in evals if e["step"] == step]
  final_eval = workdir_lib.Workdir(workdir).final_eval_path
  return {
      "format": exported.FORMAT,
      "source": {"workdir": os.fspath(workdir.resolve()) if not
                 os.fspath(workdir).startswith("gs://") else os.fspath(workdir),
                 "step_key": step_key, "step": step,
                 "mode": config.get("mode")},
      "model": {**config.model.to_dict(),
                "num_params": int(sum(np.size(x) for x in
                                      jax.tree.leaves(variables["params"])))},
      "tokenizer": {"kind": config.data.tokenizer.kind,
                    "vocab_size": int(config.model.vocab_size)},
      "audio": {"sample_rate": batching.SAMPLE_RATE, "channels": 1},
      "data": {"dataset": config.data.dataset,
               "builder_config": config.data.builder_config,
               "eval_split": config.data.eval_split,
               "eval_domains": list(config.data.eval_domains)},
      "evaluations": evals,
      "wer": at_step[-1]["wer"] if at_step else None,
      "final_eval": (json.loads(final_eval.read_text())
                     if final_eval.exists() else None),
      "versions": {"conformer_fl": _package_version(), "jax": jax.__version__,
                   "flax": flax.__version__},
  }


def _package_version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version("conformer_fl")
  except metadata.PackageNotFoundError:
    return "unknown"


def _fmt(value: float | None, digits: int = 3) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def card_markdown(card: dict[str, Any]) -> str:
  """MODEL_CARD.md: the card for people."""
  m, source = card["model"], card["source"]
  lines = [
      f"# Conformer ASR: {source['mode']} run, {source['step_key']}"
      f" {source['step']}",
      "",
      f"Exported from `{source['workdir']}` by `python -m conformer_fl.export`"
      f" ({datetime.date.today().isoformat()}).",
      "",
      "| | |",
      "|---|---|",
      f"| model | Conformer, {m.get('num_blocks')} blocks x"
      f" {m.get('model_dim')} dims, {m.get('decoder')} decoder,"
      f" {m.get('conv_norm')}; {m['num_params']:,} parameters |",
      f"| tokenizer | {card['tokenizer']['kind']},"
      f" {card['tokenizer']['vocab_size']} ids (blank included) |",
      f"| data | {card['data']['dataset']}/{card['data']['builder_config']};"
      f" evaluated on {card['data']['eval_split']}"
      f" {', '.join(card['data']['eval_domains']) or 'all domains'} |",
      "| audio | mono, 16 kHz |",
      f"| versions | {', '.join(f'{k} {v}' for k, v in card['versions'].items())} |",
      "",
      "## Measured word error rate",
      "",
  ]
  if card["evaluations"]:
    lines += [f"| {source['step_key']} | WER | 95% interval | CER | utterances |",
              "|---|---|---|---|---|"]
    lines += [f"| {e['step']} | {_fmt(e['wer'])} | {_fmt(e['wer_low'])} -"
              f" {_fmt(e['wer_high'])} | {_fmt(e['cer'])} |"
              f" {_fmt(e['num_examples'], 0)} |" for e in card["evaluations"]]
  else:
    lines.append("The run logged no evaluation up to this checkpoint.")
  if card["final_eval"]:
    lines += ["", "Final evaluation (final_eval.json): `"
              + json.dumps(card["final_eval"], sort_keys=True) + "`"]
  lines += [
      "",
      "## Use",
      "",
      "    python -m conformer_fl.tools.transcribe --workdir=THIS_DIR FILE.flac",
      "",
      "    from conformer_fl import exported",
      "    from conformer_fl.tools import transcribe",
      "    texts = transcribe.Transcriber('THIS_DIR')([audio_16khz])",
      "    loaded = exported.load_model('THIS_DIR')  # model, variables, tokenizer",
      "",
  ]
  return "\n".join(lines)


def export(workdir: str | os.PathLike[str], out: str | os.PathLike[str],
           step: int | None = None) -> dict[str, Any]:
  """Writes the exported model of `workdir`'s checkpoint `step` to `out`.

  Args:
    workdir: a central or federated run.
    out: a new or empty directory.
    step: the checkpoint; None = the latest.

  Returns:
    The model card.

  Raises:
    ExportError: `out` is not empty, or the run cannot be read (no run, no
      tokenizer, no checkpoint, no such step).
  """
  workdir, out = epath.Path(workdir), epath.Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ExportError(f"--out={out} exists and is not an empty directory:"
                      " give a new one")
  try:
    config = transcribe.load_run_config(workdir)
    transcribe.load_tokenizer(config, workdir)
    step, variables = transcribe.restore_variables(workdir, step)
  except transcribe.TranscribeError as e:
    raise ExportError(str(e)) from e
  card = model_card(workdir, config, variables, step)
  staging = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
  staging.mkdir(parents=True)
  (staging / exported.CONFIG_FILE).write_text(
      config.to_json_best_effort(indent=2))
  tokenizer_file = workdir / exported.TOKENIZER_FILE
  if config.data.tokenizer.kind == "sentencepiece":
    tokenizer_file.copy(staging / exported.TOKENIZER_FILE)
  (staging / exported.PARAMS_FILE).write_bytes(
      flax.serialization.msgpack_serialize(variables))
  (staging / exported.CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
  (staging / exported.CARD_MARKDOWN_FILE).write_text(card_markdown(card))
  if out.exists():
    out.rmdir()
  staging.rename(out)
  return card


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {list(argv[1:])}: give --workdir and --out")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Orbax logs every restore.
  try:
    card = export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step)
  except ExportError as e:
    cli.fail(str(e))
  print(f"{flags.FLAGS.out}: {card['source']['step_key']}"
        f" {card['source']['step']} of {card['source']['workdir']},"
        f" WER {_fmt(card['wer'])}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A central or federated run.")
  flags.DEFINE_string("out", None, "A new directory for the exported model.")
  flags.DEFINE_integer("step", None, "The checkpoint; default: the latest.")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, ()))
