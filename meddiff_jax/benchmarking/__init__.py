"""The paper's evaluation protocols as one command (`configs/evaluate.py`).

This package sits above tasks/ (it runs them) and below main.py: datasets.py reads the published layouts
and the generic CSV into cases, adapters.py runs one task on one case through the task's public
`run(config)`, protocols.py scores cases with evaluation/ and formats the paper-style table, run.py ties
them together and writes WORKDIR/results.json.
"""
