"""The checked-in params.yaml: valid, and explicit about every setting.

DVC re-runs a stage when its params change, but config.py (where the defaults
live) is not a stage dependency. So params.yaml must spell out every field:
then a default changed in config.py can never change a pipeline result
without a params diff that DVC sees.
"""
from __future__ import annotations

import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

from diffrep.config import Config, load_config

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def unset_fields(model: type[BaseModel], data: dict, prefix: str = "") -> list[str]:
    """Dotted names of the schema's fields that `data` leaves to their defaults."""
    out = []
    for name, field in model.model_fields.items():
        if name not in data:
            out.append(prefix + name)
            continue
        sections = [a for a in typing.get_args(field.annotation) or (field.annotation,)
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        if sections and isinstance(data[name], dict):  # a nested section (None: switched off)
            out += unset_fields(sections[0], data[name], f"{prefix}{name}.")
    return out


def test_params_yaml_validates():
    assert isinstance(load_config(PARAMS), Config)


def test_params_yaml_sets_every_field():
    assert unset_fields(Config, yaml.safe_load(PARAMS.read_text())) == []


def test_unset_fields_finds_a_missing_nested_key():
    data = yaml.safe_load(PARAMS.read_text())
    del data["ldae"]["vit"]["heads"], data["seed"]
    assert unset_fields(Config, data) == ["seed", "ldae.vit.heads"]
