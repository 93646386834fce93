"""Shared fixtures: tiny configs and one real local Ray session per test module."""

from __future__ import annotations

import os
import random
import socket

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the export step imports DeepSpeed in the test process


def free_port() -> int:
    """A free port on 127.0.0.1 between Ray's worker ports (10002-19999) and the ephemeral range (32768 and up). A port
    the OS picked from the ephemeral range and this released could be handed next to a server Ray binds to port 0 (the
    autoscaler's metrics): CI once lost a cluster's dashboard that way."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def tiny_config(run_dir, *overrides: str):
    """The built-in `tiny` config, writing into `run_dir`, with a smaller built-in corpus for speed."""
    from ptray.config import load_config

    # Tests pretrain for tens of steps, not tiny's 300: no snapshots at steps 100 and 200 unless a test asks.
    return load_config("tiny", [f"run.dir={run_dir}", "data.builtin_docs=4000", "sweep.pretrained_steps=[]",
                                *overrides])


@pytest.fixture(scope="module")
def ray_local():
    """A real in-process Ray, started the way `ptray` starts it in local mode, shut down after the module."""
    from ptray.session import ray_session

    with ray_session(tiny_config("/tmp/unused")):
        yield
