"""Prefect flows that orchestrate the DVC pipeline (docs/orchestration.md).

Kept outside `src/diffrep` so that the library and `dvc repro` never import Prefect.
"""
