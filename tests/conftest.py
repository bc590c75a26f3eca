"""Shared test settings.

One torch thread per test process: the suite runs beside subprocesses (DVC stages, DDP ranks,
Prefect workers) on a 2-core machine, and oversubscribed OpenMP threads spin instead of working
(one 8x8 U-Net step measured 0.06 s with one thread vs 4.6 s oversubscribed).
"""
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses the tests start

import torch  # noqa: E402

torch.set_num_threads(1)
