"""`fid_reference` stage: the feature-net statistics of the real test split, computed once.

Every Fréchet distance and KID of generation_eval is measured against this
artifact (data/fid_reference/, see eval/reference.py), whatever the number of
generated samples, so `eval.n_samples` is free to grow to 50,000 on a GPU and
the reference's sha256 appears in every downstream lineage block.
"""
from __future__ import annotations

from pathlib import Path

from diffrep.config import Config
from diffrep.data.prepared import load_prepared
from diffrep.eval.feature_net import load_feature_net
from diffrep.eval.features import batched
from diffrep.eval.reference import save_reference
from diffrep.io import atomic_dir, path_hash
from diffrep.stages import runner

PREPARED, FEATNET, OUT = Path("data/prepared"), Path("models/feature_net"), Path("data/fid_reference")
SET = "test"  # the reference set: never seen by the feature net, nor used for any choice


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("fid_reference", cfg, root) as ctx:
        if not ctx.is_main:
            return None
        dev = ctx.runtime.device
        prep = load_prepared(ctx.path(PREPARED))
        net = load_feature_net(ctx.path(FEATNET)).to(dev)
        prep.release_test()  # nothing is chosen here
        features = batched(net.features, prep.image_rows(SET), batch_size=cfg.eval.batch_size, device=dev).float()
        with atomic_dir(ctx.path(OUT)) as tmp:
            manifest = save_reference(tmp, features, set_name=SET, space="featnet",
                                      featnet_hash=path_hash(ctx.path(FEATNET)))
        metrics = {"set": SET, "n": manifest["n"], "dim": manifest["dim"], "space": "featnet",
                   "sha256": manifest["files"][manifest["file"]]}
        return runner.finish(ctx, metrics, params={"seed": cfg.seed, "eval": {"batch_size": cfg.eval.batch_size}}, inputs=[ctx.path(PREPARED), ctx.path(FEATNET)],
                             outputs=[ctx.path(OUT)])
