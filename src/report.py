"""Write the measured-vs-reported report of an experiment's ablation runs (src/alexnet/report/).

python src/report.py ablation_cpu                  # reports/ablation_cpu/report.{md,html} + plots
python src/report.py ablation_cpu --tracking-uri http://host:5000 --out /tmp/report
"""

from alexnet.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
