"""An Optuna sweeper for Hydra, on current Optuna: a persistent study, pruning, failures that do not end
the study, parallel trials through any Hydra launcher, and the trials' runs in MLflow.

    python src/train.py -m hparams_search=cifar_sgd
"""
