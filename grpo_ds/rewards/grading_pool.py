"""A small pool of grading processes with a hard timeout per task.

sympy can run for minutes on adversarial input (`9^{9^{9}}`, a huge expansion), in C code that
no signal interrupts. So each task runs in a worker process, and a task that is not answered in
`timeout_s` is given up on: its worker is killed and a fresh one started. The task's result is a
`TaskFailed`, which the caller counts as an error.

Workers are fresh interpreters (`python -m grpo_ds.rewards.grading_worker`), not forks: forking a
rank that holds threads, CUDA or DeepSpeed state is unsafe, and spawn-style multiprocessing
would re-run the rank's main module. They talk JSON lines over their stdin/stdout, and die with
the rank: on Linux the kernel kills them when it exits (PR_SET_PDEATHSIG), and everywhere they
exit when their stdin closes. The pool is started on first use and reused across steps.

    pool = GradingPool("grpo_ds.rewards.math_verify_grading:verify_answer", workers=2, timeout_s=5)
    pool.map([[completion, reference], ...])  ->  [True, False, TaskFailed(...), ...]
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding grpo_ds/


class TaskFailed:
    """A task that timed out, crashed its worker or raised; `reason` says which."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"TaskFailed({self.reason!r})"


class _Worker:
    """One worker process and what it is doing: starting, idle, or busy with task `index`."""

    def __init__(self, target: str, start_timeout_s: float):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "grpo_ds.rewards.grading_worker", target, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self.fd = self.process.stdout.fileno()
        self.buffer = b""
        self.ready = False
        self.index: int | None = None
        self.deadline = time.monotonic() + start_timeout_s

    def send(self, index: int, args: list, timeout_s: float) -> None:
        self.index, self.deadline = index, time.monotonic() + timeout_s
        self.process.stdin.write(json.dumps(args).encode() + b"\n")
        self.process.stdin.flush()

    def messages(self) -> list[dict] | None:
        """The complete lines now readable, decoded; None when the worker has exited."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


class GradingPool:
    """`workers` processes running `target` ("module:function"), each task under `timeout_s`."""

    def __init__(self, target: str, workers: int = 2, timeout_s: float = 5.0,
                 start_timeout_s: float = 120.0):
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"need workers >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
        self.target, self.num_workers, self.timeout_s = target, workers, timeout_s
        self.start_timeout_s = start_timeout_s
        self._workers: list[_Worker] = []
        self._owner_pid = os.getpid()
        atexit.register(self.close)

    def map(self, tasks: list[list]) -> list:
        """Each task's result (`target(*task)`), or TaskFailed; in the order of `tasks`."""
        if os.getpid() != self._owner_pid:  # a forked child must not share its parent's pipes
            self._workers, self._owner_pid = [], os.getpid()
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.target, self.start_timeout_s))
        results: list = [None] * len(tasks)
        next_task, done = 0, 0
        while done < len(tasks):
            for worker in self._workers:
                if worker.ready and worker.index is None and next_task < len(tasks):
                    worker.send(next_task, tasks[next_task], self.timeout_s)
                    next_task += 1
            done += self._collect(results)
        return results

    def _collect(self, results: list) -> int:
        """Wait for answers until the earliest deadline; store them. Returns how many finished."""
        deadline = min(w.deadline for w in self._workers)
        wait_s = None if deadline == float("inf") else max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([w.fd for w in self._workers], [], [], wait_s)
        finished = 0
        for slot, worker in enumerate(list(self._workers)):
            if worker.fd in readable:
                messages = worker.messages()
                if messages is None:
                    finished += self._replace(slot, results, "its worker exited with code "
                                              f"{worker.process.wait()}")
                    continue
                for message in messages:
                    if "ready" in message:
                        worker.ready, worker.deadline = True, float("inf")
                        continue
                    results[worker.index] = (TaskFailed(message["error"]) if "error" in message
                                             else message["result"])
                    worker.index, worker.deadline = None, float("inf")
                    finished += 1
            elif time.monotonic() >= worker.deadline:
                finished += self._replace(slot, results, f"timed out after {self.timeout_s} s")
        return finished

    def _replace(self, slot: int, results: list, reason: str) -> int:
        """Kill the worker in `slot` (failing its task), start another; 1 if it had a task."""
        worker = self._workers[slot]
        if not worker.ready:
            worker.kill()
            raise RuntimeError(f"grading worker for {self.target} did not start within "
                               f"{self.start_timeout_s} s ({reason}); see its stderr above")
        worker.kill()
        self._workers[slot] = _Worker(self.target, self.start_timeout_s)
        if worker.index is None:
            return 0
        results[worker.index] = TaskFailed(reason)
        return 1

    def close(self) -> None:
        """Stop the workers (they also stop by themselves when this process exits)."""
        if os.getpid() == self._owner_pid:
            for worker in self._workers:
                worker.kill()
        self._workers = []
