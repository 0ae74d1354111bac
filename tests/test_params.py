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

from diffrep.audit import flatten
from diffrep.config import Config, load_config, parse_config, to_dict

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


def drift(defaults: dict, params: dict) -> list[str]:
    """One line per dotted key whose schema default differs from (or is missing beside) params.yaml's value."""
    missing = object()
    return [f"{k}: schema default {defaults.get(k, missing)!r} != params.yaml {v!r} (fix the default in config.py)"
            for k, v in params.items() if defaults.get(k, missing) != v]


def test_schema_defaults_equal_params_yaml():
    """parse_config({}) resolves to exactly what params.yaml says: one set of defaults."""
    defaults = flatten(to_dict(parse_config({})))
    params = flatten(to_dict(load_config(PARAMS)))
    assert defaults.keys() == params.keys()
    assert drift(defaults, params) == []


def test_drift_names_the_key():
    params = flatten(to_dict(load_config(PARAMS)))
    changed = {**params, "soda.unet.channels": 99}
    assert drift(params, changed) == ["soda.unet.channels: schema default 16 != params.yaml 99 "
                                      "(fix the default in config.py)"]
