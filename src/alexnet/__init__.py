"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) and the machinery to ablate it.

- ``alexnet.model``: the network and its switches
- ``alexnet.module``: the training recipe (LightningModule) and the measured errors
- ``alexnet.data``: data sets, splits and transforms
- ``alexnet.tracking``: what each run records in MLflow
- ``alexnet.config``: typed schemas and the up-front config check
"""
