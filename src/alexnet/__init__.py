"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) and the machinery to ablate it. One concept, one module:

- ``model``: the network, its switches (``ModelConfig``) and the paper's LRN
- ``devices``, ``ddp``: where the network runs: one device, the columns on two, data parallel
- ``module``: the training recipe (LightningModule), the measured errors, per-image test outcomes
- ``data``, ``images``, ``presets``: data sets and loaders; image files; section 4.1's augmentation
- ``seeding``: common random numbers, the run seed's streams
- ``config``: the other config groups' schemas and the check before anything runs
- ``identity``, ``tracking``, ``task``: what a run is; what it records in MLflow; the life of a job
- ``redaction``: passwords in URLs kept out of the tracker, the logs and stdout
- ``design``: fractional factorial designs over arms
- ``search``: an Optuna trial inside a job
- ``report``: the measured-vs-reported report (claims, runs, statistics, analysis, rendering)
- ``errors``: the mistakes a person fixes, reported in one line
"""

import os

# Offline, MLflow's telemetry thread removes a variable from os.environ while a request of this process reads
# it, failing that request unretried (docs/team.md: 2 of 32 writers lost points). Off unless the user says.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
