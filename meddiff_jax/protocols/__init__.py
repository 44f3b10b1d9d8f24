"""The paper's evaluation protocols behind the `evaluate` command (`configs/evaluate.py`).

This package sits above tasks/ (it runs them) and below main.py: datasets.py reads the published layouts
and the generic CSV into cases, adapters.py runs one task on one case through the task's public
`run(config)`, paper.py runs each protocol, scores cases with evaluation/ (the metrics) and formats the
paper-style table, evaluate.py is the command: it ties them together and writes WORKDIR/results.json.
"""
