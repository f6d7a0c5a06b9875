"""The dataset registry and torchtitan's build_dataloader_fn.

`training.dataset` / `validation.dataset` pick a name from DATASETS; `*.dataset_path`
overrides where its files are. Every entry builds an IterableDataset that yields
({"input", "doc_starts"}, labels) items for one DP rank and saves its position.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable

from torchtitan.components.dataloader import ParallelAwareDataloader

from .config import BayesData, DataConfigError, data_config
from .mqar import MQARDataset, MQARSpec
from .packing import PackedTextDataset, SequenceSource
from .text import list_text_files, read_documents

SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "samples")


@dataclass
class DataRequest:
    """Everything a dataset builder needs for one role (training or validation)."""
    name: str
    path: str | None
    split: str  # "train" or "validation" role; hub datasets map it to the configured split
    seq_len: int
    dp_rank: int
    dp_world_size: int
    tokenizer: object
    cfg: BayesData
    infinite: bool


DATASETS: dict[str, Callable[[DataRequest], object]] = {}


def register_dataset(name: str, builder: Callable[[DataRequest], object]) -> None:
    DATASETS[name.lower()] = builder


def _build_mqar(req: DataRequest):
    cfg = req.cfg
    vocab = req.tokenizer.get_vocab_size()
    if cfg.mqar_vocab_size > vocab:
        raise DataConfigError(
            f"MQAR: mqar_vocab_size = {cfg.mqar_vocab_size} exceeds the tokenizer's vocabulary "
            f"({vocab}); use [bayes_data] tokenizer = \"mqar\" or a smaller mqar_vocab_size"
        )
    spec = MQARSpec(cfg.mqar_vocab_size, cfg.mqar_num_kv_pairs, req.seq_len,
                    cfg.mqar_power_a, cfg.mqar_random_fill)
    train = req.split == "train"
    return MQARDataset(
        spec, cfg.mqar_seed, req.split,
        cfg.mqar_train_examples if train else cfg.mqar_validation_examples,
        req.dp_rank, req.dp_world_size, shuffle=train and cfg.mqar_shuffle,
        infinite=req.infinite,
    )


def _build_local_text(req: DataRequest):
    path = req.path or SAMPLE_DIR
    files = list_text_files(path)
    documents = list(read_documents(files, req.cfg.text_split, req.cfg.text_field))
    if len(documents) < req.dp_world_size:
        raise DataConfigError(
            f"local_text at {path!r} has {len(documents)} documents for {req.dp_world_size} "
            "DP ranks; give it more text or choose a finer [bayes_data] text_split"
        )
    source = SequenceSource(documents, req.dp_rank, req.dp_world_size)
    return PackedTextDataset(source, req.tokenizer, req.seq_len, req.infinite, name="local_text")


register_dataset("mqar", _build_mqar)
register_dataset("local_text", _build_local_text)


def build_dataset(req: DataRequest):
    builder = DATASETS.get(req.name.lower())
    if builder is None:
        raise DataConfigError(
            f"dataset {req.name!r} is not registered; choose one of {', '.join(sorted(DATASETS))}"
        )
    return builder(req)


def _make_loader(dataset, dp_rank: int, dp_world_size: int, batch_size: int, loader_cfg):
    return ParallelAwareDataloader(
        dataset, dp_rank=dp_rank, dp_world_size=dp_world_size,
        **{**asdict(loader_cfg), "batch_size": batch_size},
    )


def build_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config,
                     infinite: bool = True) -> ParallelAwareDataloader:
    """torchtitan's build_dataloader_fn: the training data chosen by `training.dataset`."""
    training = job_config.training
    req = DataRequest(training.dataset, training.dataset_path, "train", training.seq_len,
                      dp_rank, dp_world_size, tokenizer, data_config(job_config), infinite)
    return _make_loader(build_dataset(req), dp_rank, dp_world_size,
                        training.local_batch_size, training.dataloader)


def build_validation_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config,
                                infinite: bool = False) -> ParallelAwareDataloader:
    """The validation data chosen by `validation.dataset` (its own seq_len and batch).

    Its path is `validation.dataset_path`, or `training.dataset_path` when both sections
    name the same dataset.
    """
    validation, training = job_config.validation, job_config.training
    path = validation.dataset_path
    if path is None and validation.dataset.lower() == training.dataset.lower():
        # The same dataset's other split: a local copy given for training holds it too.
        path = training.dataset_path
    req = DataRequest(validation.dataset, path, "validation",
                      validation.seq_len, dp_rank, dp_world_size, tokenizer,
                      data_config(job_config), infinite)
    return _make_loader(build_dataset(req), dp_rank, dp_world_size,
                        validation.local_batch_size, validation.dataloader)
