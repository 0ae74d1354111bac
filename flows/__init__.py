"""Prefect flows that orchestrate the DVC pipeline (DESIGN.md principle 1).

Kept outside `src/diffrep` so that the library and `dvc repro` never import Prefect.
"""
