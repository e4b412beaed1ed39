r"""Claim 5 put to a test: pre-train, analyse, adapt with cost-matched arms.

`run_experiment(config, workdir, ...)` (mode 'experiment', configs/experiment.py;
`make demo` runs it) chains the stages, each a run of its own mode in a
sub-directory of the workdir W:

  1. corpus     build the synthetic corpus if it is not built yet;
  2. pretrain   central training on the long-form domain, once  W/pretrain/,
                per seed of config.pretrain_seeds (checkpoints   W/pretrain_model1/ ...
                from step 0);
  3. analysis   per model: reset each unit (config.analysis),    .../analysis/importance.json
                paired labels; the half-width ranking            .../analysis/halfwidth.json
                (`halfwidth`); the arms at every cost level
                (`arms`);
  4. tuning     each arm's client learning rate on dev from      W/arms/model_0/...
                config.comparison.lr_grid (`design`);
  5. adapt      the final federated runs, one client per         W/arms/model_M/LEVEL/ARM/
                speaker, from each pre-trained model, each run     seed_S_lrR/
                then evaluated on config.final_eval_split
                (held-out speakers);
  6. engines    leave one speech engine out                      W/leave_out_ENGINE/
                (config.engine_check, `engines`);
     stability  only when config.stability.runs is set           W/stability/NAME/
                (claims 2 and 3, `stability_runs`);              W/stability.json
  7. summary    client costs (`costs`), not-adapted and dev      W/summary.json
                evaluations, intervals, the verdict (`verdict`), W/report.md
                figures (`figures`), the report (`report`); the  W/stage_seconds.json
                wall time of every stage that ran

The training stages run the loops `run_experiment` is given
(`conformer_fl/main.py` passes `train.train_central` and `train.train_federated`),
so this package does not import conformer_fl/train.py.

Run again, a finished stage is skipped and an interrupted one resumes from its
checkpoints, so the same config and seeds give the same WERs and costs (the
measured seconds per round vary with the machine's load). A workdir holds
one experiment: if W/experiment_config.json differs from the config in any
field but `workdir.EXPERIMENT_RESUMABLE_FIELDS` (the corpus's data_dir and the
stability runs, so that a workdir grows by stability runs), the
run stops before writing anything, naming each field with both values (the
rule of every mode, `conformer_fl.workdir.check_config`). The run holds
W/.lock (`conformer_fl.workdir.WorkdirLock`) while it lasts.

On several hosts (a pod, or `launch/local_multiprocess.py`) every process runs
every stage: the training stages over the mesh of all devices, the analysis
with its variants split over them, every evaluation with its batches split
over the processes (`conformer_fl.evaluation.evaluate`); process 0 builds the
corpus and alone writes files, and decides for all whether a stage is done
(`conformer_fl.multihost`). The summary is the same as one process's.
"""

from conformer_fl.experiment.run import check_workdir_config
from conformer_fl.experiment.run import CONFIG_FILE
from conformer_fl.experiment.run import evaluate_checkpoint
from conformer_fl.experiment.run import run_experiment
from conformer_fl.experiment.run import validate_config
