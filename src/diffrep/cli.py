"""The `diffrep` command line: pipeline stages, lineage audit, sampling.

Heavy libraries (torch, GX, Prefect) are imported inside the commands so that
`diffrep --help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# stage name -> "module:function"; each function takes (cfg, root) and returns its metrics dict
STAGES = {
    "prepare": "diffrep.stages.prepare:run",
    "soda": "diffrep.stages.soda:run",
    "ul_stage1": "diffrep.stages.ul_stage1:run",
    "ul_stage2": "diffrep.stages.ul_stage2:run",
    "ldae": "diffrep.stages.ldae:run",
    "feature_net": "diffrep.stages.feature_net:run",
    "fid_reference": "diffrep.stages.fid_reference:run",
    "linear_probe": "diffrep.stages.linear_probe:run",
    "generation_eval": "diffrep.stages.generation_eval:run",
    "report": "diffrep.stages.report:run",
    "shapes_eval": "diffrep.stages.shapes_eval:run",  # pipelines/shapes
}

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def user_errors() -> tuple[type[Exception], ...]:
    """The project's own error types: their message says what is wrong and what to do, so no traceback.

    Anything else (a shape bug, a library error) is a bug worth its traceback.
    """
    from diffrep.config import ConfigError
    from diffrep.data.sources import SourceError
    from diffrep.data.validate import DataValidationError
    from diffrep.embed import EmbedError
    from diffrep.io import ArtifactError
    from diffrep.stages.runner import StageLocked
    from diffrep.train.engine import NonFiniteLossError
    from diffrep.train.launch import LaunchError

    return (ConfigError, SourceError, DataValidationError, ArtifactError, NonFiniteLossError, StageLocked, EmbedError,
            LaunchError)


def _load_params(path: str, preset: str | None = None):
    """The validated config (with a preset overlay merged on top), or None after printing why it is not."""
    from diffrep.config import ConfigError, load_config

    try:
        over = None
        if preset:
            import yaml

            try:
                over = yaml.safe_load(open(preset).read()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ConfigError(f"{preset}: cannot read the preset ({e})") from None
            if not isinstance(over, dict):
                raise ConfigError(f"{preset}: expected a mapping at the top level, got {type(over).__name__}")
        return load_config(path, overrides=over)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _cmd_stage(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.name not in STAGES:
        print(f"diffrep stage: unknown stage {args.name!r}; choose one of: {', '.join(STAGES)}", file=sys.stderr)
        return EXIT_USAGE
    cfg = _load_params(args.params)
    if cfg is None:
        return EXIT_USAGE
    from diffrep.train.launch import launch_stage, should_launch

    module, func = STAGES[args.name].split(":")
    try:
        if should_launch(args.name, cfg.runtime):  # runtime.nproc_per_node / nnodes: this process only launches
            launch_stage(args.name, cfg.runtime, args.params, args.root, ["--traceback"] if args.traceback else [])
            return EXIT_OK
        run = getattr(importlib.import_module(module), func)
        run(cfg, Path(args.root))
    except user_errors() as e:
        if args.traceback:
            raise
        print(f"error in stage {args.name}: {e}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _cmd_params(args: argparse.Namespace) -> int:
    import json

    from diffrep.config import to_dict

    cfg = _load_params(args.params, args.preset)
    if cfg is None:
        return EXIT_USAGE
    if args.write:  # a complete params file: every key spelled out, as tests/test_params.py asks of params.yaml
        import yaml

        from diffrep.io import write_text

        head = f"# {args.params} with {args.preset} over it (`diffrep params --preset`); schema: src/diffrep/config.py\n"
        write_text(args.write, head + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))
        print(f"wrote {args.write}")
        return EXIT_OK
    print(json.dumps(to_dict(cfg), indent=2))
    return EXIT_OK


def _cmd_lineage(args: argparse.Namespace) -> int:
    from diffrep.audit import main as audit_main

    return audit_main(args)


def _cmd_sample(args: argparse.Namespace) -> int:
    from diffrep.sample import main_sample

    return main_sample(args)


def _cmd_embed(args: argparse.Namespace) -> int:
    from diffrep.embed import main_embed, main_export

    try:
        return (main_embed if args.command == "embed" else main_export)(args)
    except user_errors() as e:
        print(f"diffrep {args.command}: {e}", file=sys.stderr)
        return EXIT_FAIL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffrep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    s.add_argument("name", help=f"one of: {', '.join(STAGES)}")
    s.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    s.add_argument("--root", default=".", help="repository root the stage reads and writes under")
    s.add_argument("--traceback", action="store_true",
                   help="show the traceback of the project's own errors too (others always show theirs)")
    s.set_defaults(func=_cmd_stage)

    s = sub.add_parser("params", help="validate params.yaml and print the resolved config")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--preset", help="an overlay merged over --params, e.g. presets/cifar10.yaml")
    s.add_argument("--write", help="write the resolved config as a complete params file (e.g. params.yaml)")
    s.set_defaults(func=_cmd_params)

    s = sub.add_parser("sample", help="draw images from a trained generative model (UL: base -> decoder)")
    s.add_argument("model", choices=["ul"], help="which model to sample")
    s.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--out", required=True, help="output file: .png (a grid) or .npy (uint8 array, N C H W)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--root", default=".", help="repository root holding models/ul_stage1 and models/ul_stage2")
    s.set_defaults(func=_cmd_sample)

    s = sub.add_parser("embed", help="features of a trained encoder (pooled as the probes pool them), with ids + manifest")
    s.add_argument("model", help="a model folder: models/soda, models/ul_stage1 or models/ldae")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder of images (searched recursively) of the model's channels and size")
    src.add_argument("--split", choices=["train", "val", "test"], help="a split of data/prepared under --root")
    s.add_argument("--out", required=True, help="FILE.npy (+ FILE.json with ids and manifest) or FILE.pt")
    s.add_argument("--root", default=".", help="repository root holding data/prepared (for --split)")
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    s.set_defaults(func=_cmd_embed)

    s = sub.add_parser("export-encoder", help="the encoder's weights alone, as safetensors, for use outside diffrep")
    s.add_argument("model", help="a model folder: models/soda, models/ul_stage1 or models/ldae")
    s.add_argument("--out", required=True, help="FILE.safetensors")
    s.set_defaults(func=_cmd_embed)

    s = sub.add_parser(
        "lineage",
        help="audit a metrics file: re-hash its inputs/outputs and walk upstream (exit 0 intact, 1 broken, 2 usage)",
    )
    s.add_argument("metrics_file", help="e.g. metrics/prepare.json")
    s.add_argument("--key", default=None, help="the metric to trace, e.g. fd_featnet (shown in the report)")
    s.add_argument("--json", action="store_true", help="print the chain as JSON")
    s.add_argument("--root", default=".", help="repository root (where dvc.lock lives)")
    s.set_defaults(func=_cmd_lineage)

    from diffrep.edit import add_parsers  # `edit` and `interpolate` (the shapes pipeline's SODA)

    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `diffrep` command itself (not a caller passing argv): this checkout's code
        from diffrep.checkout import run_own_checkout

        run_own_checkout(sys.argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
