"""The harness floor: runs the matrix on top of the registries (docs/architecture.md).

``planning`` (cells, adaptive-attack policy), ``scoring`` (re-scoring and the independent check
of an attack's output), ``executors`` (local / Ray), ``runner`` (the driver), ``checks`` (the
shared randomness / probability / gradient probes), ``flags`` (reliability flags per cell and
across cells), ``validate`` (a submission's contract checks), ``reports`` (``fit --report``), and
``submission/`` (load, suites, submit, sweep, verify, sandbox).
"""
