"""Datasets, dataloaders and tokenizers (issues 4 §5 and 5).

The three torchtitan hooks a TrainSpec needs:
  build_tokenizer(job_config)                                  -> BaseTokenizer
  build_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite=True)
  build_validator(job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, ...)
Batches: ({"input": [B, T] int64, "doc_starts": [B, T] bool}, labels [B, T] int64 with -100
at ignored positions). doc_starts is True at each document's first token and at column 0.
"""

from .config import BayesData, DataConfigError, data_config
from . import hub  # registers wikitext103, wikitext2, slimpajama, slimpajama6b
from .loader import DATASETS, build_dataloader, build_validation_dataloader, register_dataset
from .tokenizers import build_tokenizer
from .validate import build_validator

__all__ = [
    "BayesData", "DataConfigError", "data_config", "DATASETS", "register_dataset",
    "build_tokenizer", "build_dataloader", "build_validation_dataloader", "build_validator",
]
