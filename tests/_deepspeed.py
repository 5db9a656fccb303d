"""The deepspeed launcher on 2 CPU ranks, for the tests that need real data parallelism."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

DEEPSPEED = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(config: Path, *flags, env: dict | None = None, timeout: int = 400):
    """``deepspeed --num_gpus 2 train.py --config CONFIG FLAGS`` on CPU ranks over gloo."""
    port = free_port()
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(TRAIN_PY), "--config",
           str(config), *flags]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", **(env or {})}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    finally:
        # DeepSpeed's CPU all-reduce leaves a 66 MB shared-memory buffer per rank behind
        for buf in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            buf.unlink(missing_ok=True)
