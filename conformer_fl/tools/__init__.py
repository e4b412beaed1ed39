"""Command-line tools around the core package.

  transcribe  audio files -> transcripts with a run's checkpoint or an exported
              model (`python -m conformer_fl.tools.transcribe`)
  sweep       a sweep config -> its points and their commands (launch/sweep.py)
  pod_plan    a run's step compiled for a TPU topology here (launch/tpu_pod.py
              plan)
"""
