"""Pre-launch checks for launch/multinode.sh: fail in seconds, with the cause named, not in a hang.

Checks, before any rank exists: the hostfile parses (with DeepSpeed's own parser, so the verdict
is the launcher's), the training config is valid for the resulting world size, the master address
resolves, and, on the machine that will host rank 0, that the rendezvous port is free. Without
these checks each mistake surfaces later: a traceback in every rank, or a node that waits for
the others until DEEPSPEED_TIMEOUT. Exit status 0 or 2.

    python launch/preflight.py --hostfile H [--num_nodes N] [--num_gpus G] [--master_addr A]
                               [--check_port P [--port_host A]] [CONFIG.yaml] [--section.key=value ...]
"""

from __future__ import annotations

import argparse
import socket
import sys


def world_size(hostfile: str, num_nodes: int, num_gpus: int) -> tuple[list[str], int]:
    """(hosts, ranks) the DeepSpeed launcher will start from this hostfile and these limits."""
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(hostfile)  # raises ValueError naming a bad line
    if not pool:
        raise ValueError(f"hostfile {hostfile!r} not found")
    hosts = list(pool.items())
    if num_nodes > 0:
        if num_nodes > len(hosts):
            raise ValueError(f"NNODES={num_nodes} but hostfile {hostfile!r} lists {len(hosts)} hosts")
        hosts = hosts[:num_nodes]
    ranks = sum(min(slots, num_gpus) if num_gpus > 0 else slots for _, slots in hosts)
    return [name for name, _ in hosts], ranks


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostfile", required=True)
    parser.add_argument("--num_nodes", type=int, default=-1)
    parser.add_argument("--num_gpus", type=int, default=-1)
    parser.add_argument("--master_addr", default=None, help="must resolve on this machine")
    parser.add_argument("--check_port", type=int, default=None,
                        help="rank 0's rendezvous port: must be free here")
    parser.add_argument("--port_host", default="",
                        help="probe the port on this address only, if it is one of ours "
                        "('' = every interface, as on node rank 0)")
    args, rest = parser.parse_known_args(argv)
    config = rest[0] if rest and not rest[0].startswith("--") else None
    overrides = rest[1:] if config else rest

    from grpo_ds.cli import port_problem
    from grpo_ds.config import ConfigError, load_config, validate

    try:
        hosts, world = world_size(args.hostfile, args.num_nodes, args.num_gpus)
    except ValueError as err:
        print(f"preflight: hostfile: {err}", file=sys.stderr)
        return 2
    try:
        validate(load_config(config, overrides), world)
    except ConfigError as err:
        print(f"preflight: config error for {world} ranks on {len(hosts)} nodes: {err}",
              file=sys.stderr)
        return 2
    if args.master_addr is not None:
        try:
            socket.getaddrinfo(args.master_addr, None)
        except socket.gaierror as err:
            print(f"preflight: MASTER_ADDR={args.master_addr!r} does not resolve here: {err}",
                  file=sys.stderr)
            return 2
    if args.check_port is not None:
        problem = port_problem(args.check_port, args.port_host)
        if problem:
            print(f"preflight: MASTER_PORT: {problem}", file=sys.stderr)
            return 2
    print(f"preflight: {len(hosts)} nodes ({', '.join(hosts)}), {world} ranks, config OK",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
