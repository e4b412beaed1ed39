r"""The study end to end: pre-train, find the ambient layers, adapt with dropout.

`run_experiment(config, workdir, ...)` (mode 'experiment', configs/experiment.py;
`make demo` runs it) chains the paper's stages, each a run of its own mode in
a sub-directory of the workdir W:

  1. corpus     build the synthetic corpus if it is not built yet;
  2. pretrain   central training on the long-form domain       W/pretrain/
                (config.pretrain, a central run config; checkpoints from step 0);
  3. analysis   reset each unit of the pre-trained model         W/pretrain/analysis/
                (config.analysis), giving importance.json;
  4. adapt      federated adaptation to the withheld short-form  W/arms/ARM/seed_S/
                domain, one client per speaker, from the pre-trained model
                (config.adapt), once per arm (`arms.ARMS`: full, uniform,
                targeted, freeze) and seed (config.seeds); each arm's run is then
                evaluated on config.final_eval_split (held-out speakers);
  5. stability  only when config.stability.runs is set           W/stability/NAME/
                (scale=study): more pre-training runs (seeds,    W/stability.json
                conv norms, a larger size), each analysed,
                compared with each other and with W/pretrain
                (`stability_runs`; claims 2 and 3);
  6. summary    client cost of each arm (`costs`), the pre-     W/summary.json
                trained model on its own dev split, the table,   W/report.md
                paired intervals, transcripts and figures
                (`summary`, `evidence`); the wall time of every
                stage that ran                                   W/stage_seconds.json

The training stages run the loops `run_experiment` is given
(`conformer_fl/main.py` passes `train.train_central` and `train.train_federated`),
so this package does not import conformer_fl/train.py.

Run again, a finished stage is skipped and an interrupted one resumes from its
checkpoints, so the same config and seeds give the same WERs and costs (the
measured seconds per round vary with the machine's load). A workdir holds
one experiment: if W/experiment_config.json differs from the config in any
field but `workdir.EXPERIMENT_RESUMABLE_FIELDS` (the corpus's data_dir and the
stability runs, so that a demo's workdir grows into the study's), the
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
