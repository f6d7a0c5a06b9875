"""Hugging Face hub datasets: WikiText-103/-2 and SlimPajama, streamed or from a local copy.

A local copy (`training.dataset_path` / `validation.dataset_path`) is read in the hub's own
file layout:
  wikitext103 / wikitext2   {path}/wikitext-103-raw-v1/{split}-*.parquet (or the -v1 config,
                            or the config folder itself; or raw text files {split}.txt,
                            wiki.{split}.tokens / .raw, with "valid" for validation)
  slimpajama                {path}/{split}/chunk*/*.jsonl.zst   (cerebras/SlimPajama-627B)
  slimpajama6b              {path}/**/{split}-*.parquet         (DKYoon/SlimPajama-6B)
Without a path the dataset streams from the hub; when the hub cannot be reached the job
stops at once with a message saying how to use local files instead.
"""

from __future__ import annotations

import glob
import json
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from .config import DataConfigError
from .loader import DataRequest, register_dataset
from .packing import PackedTextDataset, SequenceSource, StreamSource
from .text import WikiTextJoiner, join_wikitext


@dataclass(frozen=True)
class HubDataset:
    name: str
    repo: str
    configs: tuple[str, ...]  # hub config names; the first is the one streamed
    file_format: str  # "parquet" or "json" (the datasets builder for the local files)
    wikitext: bool = False  # rows are WikiText lines to join into articles
    has_meta: bool = False  # rows carry meta.redpajama_set_name
    local_streaming: bool = False  # "auto" reads a local copy as a stream

    def download_hint(self) -> str:
        include = f" --include '{self.configs[0]}/*'" if self.configs else ""
        return (f"huggingface-cli download --repo-type dataset {self.repo}{include} "
                f"--local-dir DIR")


HUB_DATASETS = {
    "wikitext103": HubDataset("wikitext103", "Salesforce/wikitext",
                              ("wikitext-103-raw-v1", "wikitext-103-v1"), "parquet", wikitext=True),
    "wikitext2": HubDataset("wikitext2", "Salesforce/wikitext",
                            ("wikitext-2-raw-v1", "wikitext-2-v1"), "parquet", wikitext=True),
    "slimpajama": HubDataset("slimpajama", "cerebras/SlimPajama-627B", (), "json",
                             has_meta=True, local_streaming=True),
    "slimpajama6b": HubDataset("slimpajama6b", "DKYoon/SlimPajama-6B", (), "parquet",
                               has_meta=True, local_streaming=True),
}
TEXT_ALIASES = {"train": ("train",), "validation": ("valid", "validation"), "test": ("test",)}


def _no_local_files(ds: HubDataset, path: str, split: str, expected: str) -> DataConfigError:
    return DataConfigError(
        f"{ds.name}: no {split} files at {path!r} (expected {expected}); point "
        f"training.dataset_path / validation.dataset_path at a copy in the hub's layout, "
        f"e.g. made with `{ds.download_hint()}`"
    )


def wikitext_local_files(ds: HubDataset, path: str, split: str) -> tuple[str, list[str]]:
    """("parquet" | "text", files) of a local WikiText copy."""
    for folder in [os.path.join(path, c) for c in ds.configs] + [path]:
        files = sorted(glob.glob(os.path.join(folder, f"{split}-*.parquet")))
        if files:
            return "parquet", files
    for alias in TEXT_ALIASES.get(split, (split,)):
        for name in (f"{alias}.txt", f"wiki.{alias}.tokens", f"wiki.{alias}.raw"):
            if os.path.isfile(os.path.join(path, name)):
                return "text", [os.path.join(path, name)]
    raise _no_local_files(ds, path, split, f"{ds.configs[0]}/{split}-*.parquet or {split}.txt")


def slimpajama_local_files(ds: HubDataset, path: str, split: str) -> list[str]:
    if ds.file_format == "json":
        files = sorted(glob.glob(os.path.join(path, split, "**", "*.jsonl.zst"), recursive=True))
        expected = f"{split}/chunk*/*.jsonl.zst"
    else:
        files = sorted(glob.glob(os.path.join(path, "**", f"{split}-*.parquet"), recursive=True))
        expected = f"data/{split}-*.parquet"
    if not files:
        raise _no_local_files(ds, path, split, expected)
    return files


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used right now, or None. Never waits more than a few seconds."""
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{flag} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        with socket.create_connection((host, port), timeout=5):
            return None
    except OSError as err:
        return f"{host}:{port} is unreachable ({err})"


def _open_hub_stream(ds: HubDataset, split: str):
    from datasets import load_dataset

    reason = hub_offline_reason()
    if reason is not None:
        raise DataConfigError(
            f"{ds.name}: cannot stream {ds.repo} from the Hugging Face hub: {reason}. "
            f"Download it where there is network (`{ds.download_hint()}`) and set "
            "training.dataset_path (and validation.dataset_path) to DIR"
        )
    config = ds.configs[0] if ds.configs else None
    try:
        return load_dataset(ds.repo, config, split=split, streaming=True)
    except Exception as err:  # network, auth and layout errors all end the same way
        raise DataConfigError(
            f"{ds.name}: could not open {ds.repo} ({config or 'default'}, {split}) on the hub: "
            f"{err}. A local copy works too: set training.dataset_path"
        ) from err


def _open_local(ds: HubDataset, files: list[str], file_format: str, streaming: bool):
    from datasets import load_dataset

    try:
        return load_dataset(file_format, data_files=files, split="train", streaming=streaming)
    except Exception as err:
        raise DataConfigError(f"{ds.name}: could not read {files[0]} and the rest as "
                              f"{file_format}: {err}") from err


def _text_of(ds: HubDataset, wanted_sets: frozenset[str]):
    """row -> text, or None for rows the redpajama_sets filter drops."""
    def to_text(row: dict) -> str | None:
        if wanted_sets:
            meta = row.get("meta")
            if isinstance(meta, str):
                meta = json.loads(meta)
            if (meta or {}).get("redpajama_set_name") not in wanted_sets:
                return None
        return row["text"]
    return to_text


def _want_streaming(ds: HubDataset, req: DataRequest, local: bool) -> bool:
    choice = str(req.cfg.streaming).lower()
    if choice == "auto":
        return ds.local_streaming if local else True
    return choice == "true"


def _build_hub_dataset(ds: HubDataset, req: DataRequest):
    split = req.cfg.train_split if req.split == "train" else req.cfg.validation_split
    if req.cfg.redpajama_sets and not ds.has_meta:
        raise DataConfigError(f"[bayes_data] redpajama_sets filters SlimPajama only, not {ds.name}")
    local = req.path is not None
    streaming = _want_streaming(ds, req, local)
    rank, world = req.dp_rank, req.dp_world_size

    if local and ds.wikitext:
        kind, files = wikitext_local_files(ds, req.path, split)
        if kind == "text" or not streaming:
            rows = _wikitext_rows(ds, kind, files)
            source = SequenceSource(join_wikitext(rows), rank, world)
            return PackedTextDataset(source, req.tokenizer, req.seq_len, req.infinite, ds.name)
        data = _open_local(ds, files, "parquet", streaming=True)
    elif local:
        files = slimpajama_local_files(ds, req.path, split)
        data = _open_local(ds, files, ds.file_format, streaming)
    else:
        if not streaming:
            raise DataConfigError(f"{ds.name}: streaming = false needs a local copy "
                                  "(training.dataset_path); from the hub it always streams")
        data = _open_hub_stream(ds, split)

    to_text = _text_of(ds, frozenset(req.cfg.redpajama_sets))
    if ds.wikitext:
        # Articles span many rows: every rank reads all rows, joins them, and keeps every
        # W-th article (WikiText is small; splitting rows by rank would cut articles).
        source = StreamSource(data, to_text, rank, world, joiner=WikiTextJoiner())
    elif streaming:
        source = StreamSource(_rank_share(data, rank, world), to_text)
    else:
        source = SequenceSource(_MappedTexts(data, to_text), rank, world)
    return PackedTextDataset(source, req.tokenizer, req.seq_len, req.infinite, ds.name)


def _rank_share(data, rank: int, world: int):
    """This rank's part of a stream: whole files when there are enough of them.

    datasets' split_dataset_by_node falls back to every W-th row (all ranks reading every
    file) unless the file count divides by W: with SlimPajama's 59,166 files and 8 ranks
    that would be 8x the reading. Uneven whole-file shares cost nothing in an endless run.
    """
    if data.num_shards >= world:
        return data.shard(num_shards=world, index=rank, contiguous=False)
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(data, rank=rank, world_size=world)


def _wikitext_rows(ds: HubDataset, kind: str, files: list[str]) -> list[str]:
    if kind == "text":
        with open(files[0], encoding="utf-8") as f:
            return f.readlines()
    import pyarrow.parquet as pq

    rows = []
    for file in files:
        table = pq.read_table(file, columns=["text"])
        rows.extend(table.column("text").to_pylist())
    return rows


class _MappedTexts:
    """A map-style HF Dataset seen as a sequence of texts (None for filtered-out rows)."""

    def __init__(self, data, to_text):
        self.data, self.to_text = data, to_text

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> str | None:
        return self.to_text(self.data[index])


for _ds in HUB_DATASETS.values():
    register_dataset(_ds.name, lambda req, ds=_ds: _build_hub_dataset(ds, req))
