"""The training loop that central and federated training share.

  run_setup   a run opened in its workdir: checks, lock (process 0), tokenizer,
              config.json, checkpoint store, metrics logger; evaluation helpers
  state       the state restored from the newest intact checkpoint or saved as
              step 0, later saves, exploded checkpoints set aside
  divergence  the divergence guard (non-finite steps) and the loss-explosion
              guard
  loop        the loop: a step callable run to the end on a cadence of read /
              log / eval / checkpoint (`clu.periodic_actions`), with a progress
              bar

`conformer_fl/train.py` builds the two kinds of training on it.
"""
