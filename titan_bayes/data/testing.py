"""Helpers for tests of the data package: job configs, a network guard, batch collection."""

from __future__ import annotations

import contextlib
import json
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
    job.validation.dataset_path = validation_path
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


class NetworkBlocked(ConnectionRefusedError):
    """What a blocked connect raises: an OSError, like a real unreachable network."""


@contextlib.contextmanager
def no_network(offline_env: bool = True):
    """Block outgoing connections of this process; set the HF offline flags, or clear them.

    Every connect of a network socket raises; DNS lookups fail too, so a library that
    ignores the offline flags still cannot reach anything.
    """
    saved_connect = socket.socket.connect
    saved_connect_ex = socket.socket.connect_ex
    saved_getaddrinfo = socket.getaddrinfo
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}

    def refuse(*_args, **_kwargs):
        raise NetworkBlocked("network access is blocked in this test")

    def guarded(original):
        # Unix-domain sockets stay usable: loader worker processes talk through them.
        def connect(sock, *args, **kwargs):
            if sock.family == socket.AF_UNIX:
                return original(sock, *args, **kwargs)
            refuse()
        return connect

    socket.socket.connect = guarded(saved_connect)
    socket.socket.connect_ex = guarded(saved_connect_ex)
    socket.getaddrinfo = refuse
    for key in saved_env:
        if offline_env:
            os.environ[key] = "1"
        else:  # only the socket guard: what a machine without network looks like
            os.environ.pop(key, None)
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


# --- fixtures in the hub's own file layouts --------------------------------------------

WORDS = ("the filter state restarts at every document boundary while the memory keeps "
         "its prior covariance and the gain shrinks as evidence accumulates over tokens").split()


def fake_sentence(rng, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def wikitext_rows(n_articles: int, seed: int = 0) -> list[str]:
    """Rows as in Salesforce/wikitext: headings, section headings, paragraphs, empty rows."""
    import random

    rng = random.Random(seed)
    rows = []
    for a in range(n_articles):
        rows += ["", f" = Article {seed}-{a} = \n", ""]
        for s in range(rng.randint(1, 3)):
            if s:
                rows += [f" = = Section {s} = = \n", ""]
            rows += [f" {fake_sentence(rng, rng.randint(5, 40))} .\n", ""]
    return rows


def write_wikitext_copy(root: str, config: str, rows_by_split: dict[str, list[str]],
                        shards: int = 3) -> None:
    """{root}/{config}/{split}-0000i-of-0000n.parquet files with a `text` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = os.path.join(root, config)
    os.makedirs(folder, exist_ok=True)
    for split, rows in rows_by_split.items():
        step = -(-len(rows) // shards)
        for i in range(shards):
            part = rows[i * step:(i + 1) * step]
            pq.write_table(pa.table({"text": pa.array(part, pa.string())}),
                           os.path.join(folder, f"{split}-{i:05d}-of-{shards:05d}.parquet"))


REDPAJAMA_SETS = ("RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaArXiv",
                  "RedPajamaWikipedia", "RedPajamaStackExchange", "RedPajamaBook")


def slimpajama_records(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [{"text": f"doc {seed}-{i}: " + fake_sentence(rng, rng.randint(3, 60)),
             "meta": {"redpajama_set_name": REDPAJAMA_SETS[i % len(REDPAJAMA_SETS)]}}
            for i in range(n)]


def write_slimpajama_copy(root: str, records_by_split: dict[str, list[dict]],
                          chunks: int = 2, files_per_chunk: int = 2) -> None:
    """{root}/{split}/chunk{c}/example_{train|holdout}_{i}.jsonl.zst, as cerebras/SlimPajama-627B."""
    import zstandard

    n_files = chunks * files_per_chunk
    for split, records in records_by_split.items():
        stem = "example_train" if split == "train" else "example_holdout"
        for f in range(n_files):
            folder = os.path.join(root, split, f"chunk{f // files_per_chunk + 1}")
            os.makedirs(folder, exist_ok=True)
            lines = "".join(json.dumps(r) + "\n" for r in records[f::n_files])
            with open(os.path.join(folder, f"{stem}_{f % files_per_chunk}.jsonl.zst"), "wb") as out:
                out.write(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))


def write_slimpajama6b_copy(root: str, records_by_split: dict[str, list[dict]],
                            shards: int = 2) -> None:
    """{root}/data/{split}-0000i-of-0000n.parquet with text, meta (struct), __index_level_0__."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = os.path.join(root, "data")
    os.makedirs(folder, exist_ok=True)
    for split, records in records_by_split.items():
        step = -(-len(records) // shards)
        for i in range(shards):
            part = records[i * step:(i + 1) * step]
            table = pa.table({"text": [r["text"] for r in part], "meta": [r["meta"] for r in part],
                              "__index_level_0__": list(range(i * step, i * step + len(part)))})
            pq.write_table(table, os.path.join(folder, f"{split}-{i:05d}-of-{shards:05d}.parquet"))
