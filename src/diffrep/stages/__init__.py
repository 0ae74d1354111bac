"""Pipeline stages: each module has `run(cfg, root) -> metrics dict`, called by `diffrep stage NAME`."""
