"""The measured-vs-reported report: the ablation runs read back from MLflow, claim by claim.

    python src/report.py ablation_cpu      # reports/ablation_cpu/report.{md,html} and the plots

- ``claims``: the paper's claims (conf/claims.yaml) and the arms that test them;
- ``runs``: the runs, their per-image outcomes, and the contexts in which they may be compared;
- ``stats``: intervals over seeds and test images, verdicts, Holm's correction, power (numpy, scipy and
  statsmodels only: it imports alone);
- ``rows``: a row of the report and its verdicts, corrected within its declared family;
- ``analysis``, ``figure1``, ``factorial``: from runs to rows, by kind of claim;
- ``document``, ``render``, ``plots``: the rows as one document, written as Markdown and HTML;
- ``cli``: ``python src/report.py``.
"""
