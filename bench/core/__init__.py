"""The ground floor: what every other part of the project imports, importing nothing above it.

``registry`` (the component registries), ``paths`` (data, weights and cache locations),
``hashing`` (every sha256), ``provenance``, ``schema`` (closed vocabularies, the per-sample row,
flag records), ``store`` (the SQLite result store), ``config`` (the benchmark configuration),
``metrics`` (image and latent-space measures). See docs/architecture.md.
"""
