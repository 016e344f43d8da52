"""`grpo-ds`: train, plan, bench, export, plot.

`grpo-ds train` validates the config and reads the model's config and tokenizer, the data files
and the reward functions in this process (seconds, before any rank exists; grpo_ds/preflight.py),
then starts the `deepspeed` launcher with N local ranks running `grpo_ds.train`. N defaults to every
GPU, or 2 on a machine without GPUs (DeepSpeed's own default on CPU is the NUMA-node count: 1).
GPUs that SLURM or CUDA_VISIBLE_DEVICES assigned are the ones used (launch_devices.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys

from grpo_ds.build_locks import build_lock_problem
from grpo_ds.checkpoint import CheckpointError, checkpoint_root, find_resume
from grpo_ds.config import ConfigError, load_config, validate
from grpo_ds.cpu.host_memory import HostAllocatorError, host_allocator_env
from grpo_ds.failures import rank_processes
from grpo_ds.launch_devices import LaunchError, include_spec, launch_devices
from grpo_ds.lifeline import PARENT_ENV, die_with_parent, parent_token
from grpo_ds.port_lock import PortTaken, claim_port
from grpo_ds.rewards.loading import RewardSpecError
from grpo_ds.run_lock import HELD_ENV, RunDirError, RunLock, check_fresh_start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_problem(port: int, host: str = "") -> str | None:
    """Why rank 0 could not listen on `port` on this machine, or None if it can.

    host "" probes every interface, as torch's TCPStore binds. SO_REUSEADDR, as TCPStore sets, so
    only a live listener counts, not a closed connection in TIME_WAIT.
    """
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return (f"master port {port} is already in use on this machine (another job?): "
                        "set another port, or leave it unset to pick a free one")
            if err.errno == errno.EACCES:
                return f"master port {port}: permission denied (ports below 1024 need root)"
            if err.errno == errno.EADDRNOTAVAIL:
                return None  # `host` is another machine's address: nothing to check here
            raise
    return None


def default_num_ranks() -> int:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return 2
    return max(1, accelerator.device_count())


def launcher_env(host_allocator: str = "auto") -> tuple[dict[str, str], str]:
    """The environment of the launcher and its ranks, and a line naming their host allocator."""
    from deepspeed.accelerator import get_accelerator

    env = dict(os.environ)
    on_cpu = get_accelerator().device_name() == "cpu"
    if "DS_ACCELERATOR" not in env and on_cpu:
        env["DS_ACCELERATOR"] = "cpu"  # what we detected: spares every process the warning
    extra, note = host_allocator_env(host_allocator, on_cpu, env)
    return {**env, **extra}, note


def launcher_command(config: str | None, overrides: list[str], num_ranks: int, port: int,
                     devices: list[int] | None = None) -> list[str]:
    """The `deepspeed` command: ranks on the assigned `devices` (launch_devices.py) if any, else
    `--num_gpus num_ranks` (devices 0..N-1, or N CPU processes)."""
    launcher = shutil.which("deepspeed") or "deepspeed"
    ranks = ["--include", include_spec("localhost", devices)] if devices \
        else ["--num_gpus", str(num_ranks)]
    command = [launcher, *ranks, "--master_port", str(port), "--module", "grpo_ds.train"]
    return command + ([config] if config else []) + overrides


def assigned_launch_devices(requested: int | None) -> list[int] | None:
    """The GPUs SLURM or CUDA_VISIBLE_DEVICES assigned this launch (launch_devices.py)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return None  # CPU ranks are only numbered (and this device_count runs a subprocess)
    return launch_devices(os.environ, accelerator.device_name(), accelerator.device_count(),
                          requested)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    overrides = [a for a in extra if a.startswith("--") and "=" in a]
    unknown = [a for a in extra if a not in overrides]
    if args.resume:
        overrides.append(f"--checkpoint.resume={args.resume}")
    if unknown:
        print(f"grpo-ds train: unexpected arguments {unknown}; overrides look like "
              "--section.key=value", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, overrides)
        devices = assigned_launch_devices(cfg.deepspeed.num_gpus)
        num_ranks = len(devices) if devices else cfg.deepspeed.num_gpus or default_num_ranks()
        validate(cfg, num_ranks)
        # the device choices, resolved here as each rank will (a CPU kernel asked for on a GPU,
        # flash_attention_2 without flash_attn) fail now rather than in every rank
        from grpo_ds.device import resolve_config

        resolve_config(cfg)
        resume_from = find_resume(cfg.checkpoint.resume, checkpoint_root(cfg))
    except (ConfigError, CheckpointError, RewardSpecError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except LaunchError as err:
        print(f"grpo-ds train: GPU assignment: {err}", file=sys.stderr)
        return 2
    from grpo_ds.preflight import preflight  # imports transformers/datasets: after the config

    try:
        preflight(cfg)
    except ValueError as err:  # ConfigError, DataError, RewardSpecError: each names its input
        print(f"grpo-ds train: {err}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as held:  # the port and the run dir stay claimed until the end
        port, problem = claim_job(held, cfg, resume_from, args.overwrite)
        if problem:
            print(f"grpo-ds train: {problem}", file=sys.stderr)
            return 2
        return launch(port, args, cfg, overrides, num_ranks, devices)


def claim_job(held: contextlib.ExitStack, cfg, resume_from, overwrite: bool
              ) -> tuple[int, str | None]:
    """Claim the master port, then the run dir, for the whole job (`held` releases them):
    (port, None), or (0, why not). Locks, not probes: two runs started at once cannot both pass
    (grpo_ds/port_lock.py, grpo_ds/run_lock.py), and nothing is written before the run dir's."""
    try:
        port_lock = claim_port(cfg.deepspeed.master_port, cfg.output.run_dir, free_port)
    except PortTaken as err:
        return 0, f"deepspeed.master_port: {err}"
    held.callback(port_lock.release)
    problem = port_problem(port_lock.port)
    if problem:
        # Checked here because a busy port otherwise fails inside every rank, after the imports.
        return 0, f"deepspeed.master_port: {problem}"
    problem = build_lock_problem()
    if problem:  # otherwise every rank hangs, silently, where it loads DeepSpeed's ops
        return 0, problem
    try:
        run_lock = RunLock(cfg.output.run_dir)
        held.callback(run_lock.release)
        if resume_from is None:
            check_fresh_start(cfg.output.run_dir, checkpoint_root(cfg), overwrite)
    except RunDirError as err:
        return 0, str(err)
    return port_lock.port, None


def launch(port: int, args: argparse.Namespace, cfg, overrides: list[str],
           num_ranks: int, devices) -> int:
    """Start the launcher tied to this process, forward signals to the ranks, wait."""
    try:
        env, allocator_note = launcher_env(cfg.deepspeed.host_allocator)
    except HostAllocatorError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    env[HELD_ENV] = str(os.path.realpath(cfg.output.run_dir))
    env[PARENT_ENV] = parent_token()  # ranks die with this process (grpo_ds/lifeline.py)
    command = launcher_command(args.config, overrides, num_ranks, port, devices)
    print(f"launching {num_ranks} ranks: {' '.join(command)}\n{allocator_note}", flush=True)
    # Own session: a terminal's Ctrl-C reaches only this process, which forwards it.
    process = subprocess.Popen(command, start_new_session=True, env=env,
                               preexec_fn=die_with_parent)  # noqa: PLW1509 - no threads yet

    def forward(signum, _frame):
        # To the ranks only: they finish the step, save, and exit with 143, which the launcher
        # passes on. A signalled launcher would SIGTERM them again and SIGKILL them after 30 s.
        ranks = rank_processes(process.pid)
        for rank in ranks:
            rank.send_signal(signum)
        if not ranks:  # not started yet
            os.killpg(process.pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    return process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpo-ds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run GRPO (no CONFIG: the embedded default)")
    train.add_argument("config", nargs="?", help="YAML config; overrides: --section.key=value")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|latest|PATH",
                       help="resume from a checkpoint (alone: auto, the latest if there is one)")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in a run_dir that holds an earlier run's output")
    sub.add_parser("plan", help="per-rank memory plan before launch", add_help=False)
    bench = sub.add_parser("bench", help="benchmarks: generation, step, memory, grading")
    bench.add_argument("which", choices=["generation", "step", "memory", "grading"])
    sub.add_parser("export", help="checkpoint -> Hugging Face model directory", add_help=False)
    sub.add_parser("plot", help="PNG of a run's main curves", add_help=False)
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        return cmd_train(args, extra)
    if args.command == "plan":
        from grpo_ds.tools.plan_cli import main as plan_main

        return plan_main(extra)
    if args.command == "bench":
        import importlib

        module = importlib.import_module(f"grpo_ds.tools.bench.{args.which}")
        return module.main(extra)
    if args.command == "export":
        from grpo_ds.export import main as export_main

        return export_main(extra)
    if args.command == "plot":
        from grpo_ds.plot import main as plot_main

        return plot_main(extra)
    return 2


if __name__ == "__main__":
    sys.exit(main())
