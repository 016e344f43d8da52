"""Helpers for tests that launch real multi-rank DeepSpeed jobs as separate processes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run tests/scripts/<script> under the deepspeed launcher; fail the test with its output."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(SCRIPTS / script), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}:\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result
