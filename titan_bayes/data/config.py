"""The `[bayes_data]` TOML section: tokenizer and dataset options that torchtitan lacks."""

from dataclasses import dataclass


@dataclass
class BayesData:
    # "bytes" (no files needed), "tiktoken" (local rank file) or "hf" (tokenizer.json folder
    # given by model.hf_assets_path).
    tokenizer: str = "bytes"
