"""`python -m bench`: see bench/cli.py (kept separate so tests can import the CLI without running it)."""
import os
import sys

# torch.profiler's Kineto logs "gpuGetDeviceCount failed" on CPU-only machines: harmless, but reads like a failure
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

from bench.cli import main  # noqa: E402

sys.exit(main())
