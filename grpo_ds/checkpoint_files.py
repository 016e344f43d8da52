"""A checkpoint directory's files: names, the `latest` pointer, durable writes, pruning, and
the cleanup a resume does (newer checkpoints set aside, metrics trimmed). No engine here:
checkpoint.py saves and loads through DeepSpeed and uses these.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

STATE_FILE = "grpo_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
ABANDONED_DIR = re.compile(r"^step_\d+\.abandoned-")  # named by `set_aside_newer`


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_name(root: Path) -> str | None:
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def point_latest(root: Path, name: str) -> None:
    """Move `latest` to `name` atomically: readers see the old name or the new one, never half."""
    tmp = root / "latest.tmp"
    write_durably(tmp, name.encode())
    os.replace(tmp, root / "latest")
    fsync_file(root)  # the rename itself is durable only once the directory is synced


def step_dirs(root: Path) -> dict[int, Path]:
    found = {}
    if root.is_dir():
        for child in root.iterdir():
            match = STEP_DIR.match(child.name)
            if match and child.is_dir():
                found[int(match.group(1))] = child
    return found


def prune(root: Path, keep_last: int, current: int) -> None:
    """Delete checkpoints older than `current` beyond the newest `keep_last` complete ones, and
    leftovers of failed saves. Never anything newer than `current`, nor what `latest` names.
    Checkpoints set aside as `*.abandoned-*` count against `keep_last` too: they go once the run
    has `keep_last` complete checkpoints of its own (with keep_last=0 every one is kept)."""
    dirs = step_dirs(root)
    complete = sorted(s for s, p in dirs.items() if s <= current and (p / STATE_FILE).is_file())
    keep = set(complete[-keep_last:] if keep_last else complete) | {current}
    pointed = latest_name(root)
    for step, path in dirs.items():
        if step < current and step not in keep and path.name != pointed:
            shutil.rmtree(path, ignore_errors=True)
    if keep_last and len(complete) >= keep_last:
        for child in root.iterdir():
            if ABANDONED_DIR.match(child.name) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def set_aside_newer(root: Path, start: int, log) -> None:
    """Rename checkpoints newer than the start step (an abandoned attempt, or an earlier run when
    starting fresh) to `<name>.abandoned-<time>`, so saves never mix with them; fix `latest`."""
    newer = {s: p for s, p in step_dirs(root).items() if s > start}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in newer.values():
        target, n = path.with_name(f"{path.name}.abandoned-{stamp}"), 1
        while target.exists():
            target, n = path.with_name(f"{path.name}.abandoned-{stamp}-{n}"), n + 1
        path.rename(target)
    if newer:
        log(f"checkpoints newer than step {start} renamed to *.abandoned-{stamp} in {root}")
    if latest_name(root) in {p.name for p in newer.values()}:
        if start and (root / step_name(start) / STATE_FILE).is_file():
            point_latest(root, step_name(start))
        else:
            (root / "latest").unlink()


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl lines past the resumed step (logged after the checkpoint, then lost)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except json.JSONDecodeError:
            pass
        kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
