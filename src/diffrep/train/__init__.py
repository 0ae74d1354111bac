"""The one training engine every diffrep model uses (see engine.py for the model protocol)."""
from diffrep.train.distributed import DistInfo, dist_info, setup_distributed, teardown_distributed
from diffrep.train.engine import (
    NonFiniteLossError,
    Trainer,
    TrainResult,
    ema_decay_at,
    lr_factor,
    update_ema,
)
from diffrep.train.rng import BatchRNG, derive_seed

__all__ = [
    "BatchRNG", "DistInfo", "NonFiniteLossError", "TrainResult", "Trainer", "derive_seed", "dist_info",
    "ema_decay_at", "lr_factor", "setup_distributed", "teardown_distributed", "update_ema",
]
