"""Two runs cannot share a master port: the second stops before launching, naming the first."""

import os

import pytest

from grpo_ds.cli import main as cli_main
from grpo_ds.port_lock import PortLock, PortTaken, claim_port
from tests.multirank import free_port


def test_a_held_port_is_refused_naming_the_holder(tmp_path):
    port = free_port()
    held = PortLock(port, str(tmp_path / "first"))
    try:
        with pytest.raises(PortTaken, match=rf"master port {port} is held by another grpo-ds run "
                                            rf".*pid {os.getpid()}, run_dir {tmp_path / 'first'}"):
            PortLock(port, "second")
    finally:
        held.release()
    PortLock(port, "second").release()  # free again once released


def test_an_automatic_port_skips_held_ones(tmp_path):
    taken, free = free_port(), free_port()
    held = PortLock(taken, "first")
    picks = iter([taken, taken, free])
    try:
        lock = claim_port(None, "second", lambda: next(picks))
        assert lock.port == free
        lock.release()
    finally:
        held.release()


def test_train_on_a_held_port_stops_before_launch(tmp_path, capsys):
    port = free_port()
    held = PortLock(port, str(tmp_path / "first"))
    try:
        code = cli_main(["train", f"--output.run_dir={tmp_path / 'second'}",
                         "--deepspeed.num_gpus=1", f"--deepspeed.master_port={port}"])
    finally:
        held.release()
    out, err = capsys.readouterr()
    assert code == 2 and f"deepspeed.master_port: master port {port} is held" in err
    assert "launching" not in out
    assert not (tmp_path / "second" / "run.lock").exists()  # the run dir was let go too
