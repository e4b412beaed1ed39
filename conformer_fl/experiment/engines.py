"""Leave one speech engine out: is the model a model of speech, or of one voice engine?

The synthetic corpus speaks through two engines (eSpeak NG and Flite). With
`config.engine_check.leave_out` = E, the stage pre-trains a model as
`config.pretrain` does (its recipe, `engine_check.steps` steps) on the train
speakers of every other engine (`input_pipeline.leave_one_engine_out`), then
evaluates it on the test split's speakers of E (never heard: another engine,
and voices held out by timbre) and, beside it, on the test speakers of the
engines it trained on (in-domain). The pre-trained model of the experiment,
which heard E in training, is evaluated on E's test speakers too.
"""

from collections.abc import Callable
import os
from typing import Any

from etils import epath
import ml_collections

from conformer_fl import checkpointing
from conformer_fl import multihost
from conformer_fl.data import input_pipeline
from conformer_fl.data import tts_engines

# evaluate(run_dir, split, data_config, step) -> the evaluation dict.
EvaluateFn = Callable[..., dict[str, Any]]
_KEYS = ("wer", "wer_low", "wer_high", "cer", "num_examples", "num_speakers")


def run_dir(workdir: epath.Path, engine: str) -> epath.Path:
  return epath.Path(workdir) / f"leave_out_{engine}"


def _summary(evaluation: dict[str, Any]) -> dict[str, Any]:
  return {k: evaluation.get(k) for k in _KEYS}


def run_stage(config: ml_collections.ConfigDict, workdir: epath.Path, *,
              train_central: Callable[[ml_collections.ConfigDict, str], Any],
              evaluate: EvaluateFn, timed: Callable[[str], Any],
              announce: Callable[[str], None]) -> dict[str, Any] | None:
  """Pre-trains without `engine_check.leave_out` and evaluates (module docstring).

  Args:
    config: the experiment config.
    workdir: W (W/pretrain is pre-trained already).
    train_central: the central loop.
    evaluate: `run.evaluate_checkpoint` (cached by the caller's rules).
    timed: records a stage's wall time.
    announce: prints one progress line.

  Returns:
    None when off; else {'engine', 'steps', 'held_out', 'in_domain',
    'trained_with_engine'}, each evaluation {'wer', 'wer_low', 'wer_high',
    'cer', 'num_examples', 'num_speakers'} on the long-form test split.
  """
  engine = config.engine_check.leave_out
  if not engine:
    return None
  if engine not in tts_engines.ENGINES:
    raise ValueError(f"config.engine_check.leave_out={engine!r}; expected one"
                     f" of {tts_engines.ENGINES} or ''.")
  data = config.pretrain.data.copy_and_resolve_references()
  train_data, held_out = input_pipeline.leave_one_engine_out(data, engine)
  in_domain = ml_collections.ConfigDict(held_out.to_dict())
  in_domain.eval_engines = tuple(train_data.train_engines)
  run_config = config.pretrain.copy_and_resolve_references()
  with run_config.unlocked():
    run_config.data = train_data
    run_config.central.num_steps = (config.engine_check.steps or
                                    run_config.central.num_steps)
  steps = run_config.central.num_steps
  out_dir = run_dir(workdir, engine)
  if multihost.chief_decides(
      checkpointing.latest_saved_step(out_dir) == steps, "stage_done"):
    announce(f"leave out {engine}: pre-training done, reused")
  else:
    announce(f"leave out {engine}: {steps} central steps without {engine}"
             f" -> {out_dir}")
    with timed(f"engines/{engine}"):
      train_central(run_config, os.fspath(out_dir))
  return dict(
      engine=engine, steps=steps,
      trained_on=list(train_data.train_engines),
      held_out=_summary(evaluate(out_dir, "test", data_config=held_out,
                                 step=steps, name=f"held_out_{engine}")),
      in_domain=_summary(evaluate(out_dir, "test", data_config=in_domain,
                                  step=steps, name="in_domain")),
      trained_with_engine=_summary(evaluate(
          workdir / "pretrain", "test", data_config=held_out,
          step=config.pretrain.central.num_steps, name=f"heard_{engine}")))
