"""Helpers for tests of the data package: job configs, a network guard, batch collection."""

from __future__ import annotations

import contextlib
import os
import socket

from torchtitan.config import JobConfig

from .config import BayesData


def make_job_config(dataset: str = "mqar", seq_len: int = 64, batch: int = 4,
                    dataset_path: str | None = None, validation_dataset: str | None = None,
                    validation_path: str | None = None, **bayes_data) -> JobConfig:
    """A torchtitan JobConfig with a `bayes_data` section, as the TOML loader would build it."""
    job = JobConfig()
    job.training.dataset = dataset
    job.training.dataset_path = dataset_path
    job.training.seq_len = seq_len
    job.training.local_batch_size = batch
    job.validation.dataset = validation_dataset or dataset
    job.validation.dataset_path = validation_path if validation_dataset else (validation_path or dataset_path)
    job.validation.seq_len = seq_len
    job.validation.local_batch_size = batch
    job.bayes_data = BayesData(**bayes_data)
    return job


def take(loader, steps: int) -> list:
    """The first `steps` batches of an iterator over a loader."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == steps:
            break
    return out


class NetworkBlocked(RuntimeError):
    pass


@contextlib.contextmanager
def no_network(offline_env: bool = True):
    """Block outgoing connections of this process (and, optionally, set the HF offline flags).

    Every socket connect raises; DNS lookups fail too, so a library that ignores the
    offline flags still cannot reach anything.
    """
    saved_connect = socket.socket.connect
    saved_connect_ex = socket.socket.connect_ex
    saved_getaddrinfo = socket.getaddrinfo
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}

    def refuse(*_args, **_kwargs):
        raise NetworkBlocked("network access is blocked in this test")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.getaddrinfo = refuse
    if offline_env:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        yield
    finally:
        socket.socket.connect = saved_connect
        socket.socket.connect_ex = saved_connect_ex
        socket.getaddrinfo = saved_getaddrinfo
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
