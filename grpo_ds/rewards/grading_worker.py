"""A grading worker: `python -m grpo_ds.rewards.grading_worker MODULE:FUNCTION PARENT_PID`.

Reads one JSON list of arguments per line on stdin and answers each with one JSON line on
stdout: `{"result": FUNCTION(*args)}`, or `{"error": "..."}` when it raised. The first line out
is `{"ready": true}`, once FUNCTION is imported, so import time never counts against a task's
timeout. It exits when stdin closes or (Linux) when PARENT_PID dies. Started by grading_pool.py.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, even mid-computation."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def main(target: str, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    answers = os.fdopen(os.dup(1), "w")  # the protocol channel ...
    os.dup2(2, 1)  # ... and anything the graded code prints goes to stderr instead
    # Timeouts are enforced by the pool (it kills this process), so Math-Verify's own are off
    # and its "timeout is disabled" warning is noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        try:
            message = {"result": function(*json.loads(line))}
        except Exception as error:  # noqa: BLE001 (reported to the pool as this task's failure)
            message = {"error": f"{type(error).__name__}: {error}"[:500]}
        answers.write(json.dumps(message) + "\n")
        answers.flush()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
