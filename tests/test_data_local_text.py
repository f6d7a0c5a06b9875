"""local_text: file formats, document splitting, packed windows with document starts."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from titan_bayes.data import DataConfigError, build_dataloader, build_tokenizer
from titan_bayes.data.testing import make_job_config, take
from titan_bayes.data.text import split_text

DOCS = ["alpha beta gamma", "a second, longer document about filters", "x",
        "fourth document here", "the fifth one", "sixth and last document of the set"]


def text_job(path=None, seq_len=16, batch=2, **bayes_data):
    return make_job_config("local_text", seq_len=seq_len, batch=batch, dataset_path=path,
                           tokenizer="bytes", **bayes_data)


def make_loader(job, rank=0, world=1):
    return build_dataloader(world, rank, build_tokenizer(job), job)


def expected_windows(docs, seq_len, n):
    """Independent oracle: the packed stream and, per position, whether a document starts."""
    stream, starts = [], []
    for doc in docs:
        ids = [256] + list(doc.encode()) + [257]
        starts += [True] + [False] * (len(ids) - 1)
        stream += ids
    out = []
    for w in range(n):
        lo = w * (seq_len + 1)
        tokens, flags = stream[lo:lo + seq_len + 1], starts[lo:lo + seq_len + 1]
        labels = [(-100 if flags[t + 1] else tokens[t + 1]) for t in range(seq_len)]
        doc_starts = [t == 0 or flags[t] for t in range(seq_len)]
        out.append((tokens[:-1], doc_starts, labels))
    return out


def test_windows_carry_document_starts_and_never_predict_across_documents(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    seq_len, batch = 16, 2
    n_windows = sum(len(d) + 2 for d in DOCS) // (seq_len + 1)
    batches = take(make_loader(text_job(str(tmp_path), seq_len, batch)), n_windows // batch)
    rows = [(b["input"][i], b["doc_starts"][i], y[i]) for b, y in batches for i in range(batch)]
    oracle = expected_windows(DOCS, seq_len, len(rows))
    assert sum(bool(d[1:].any()) for _, d, _ in rows) > 0, "test needs windows with 2 documents"
    for (tokens, doc_starts, labels), (e_tokens, e_starts, e_labels) in zip(rows, oracle):
        assert tokens.tolist() == e_tokens
        assert doc_starts.tolist() == e_starts
        assert labels.tolist() == e_labels


def test_txt_splits():
    text = " = Alpha = \n\n Alpha text .\n = = Part = = \n more .\n\n = Beta = \n Beta text .\n"
    assert split_text(text, "wikitext") == [
        " = Alpha = \n Alpha text .\n = = Part = = \n more .\n", " = Beta = \n Beta text .\n"]
    assert split_text("p1 line\np1 more\n\n  \np2\n", "blank_line") == ["p1 line\np1 more", "p2"]
    assert split_text("a\n\nb\n", "line") == ["a", "b"]
    assert split_text("a\n\nb\n", "file") == ["a\n\nb\n"]


def test_folder_of_mixed_formats_and_dp_sharding(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": DOCS[1]}) + "\n" + json.dumps({"body": DOCS[2]}) + "\n")
    pq.write_table(pa.table({"body": DOCS[3:]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("not,read\n")
    seen = []
    for rank in range(2):
        job = text_job(str(tmp_path), seq_len=8, batch=1, text_field="body")
        dl = make_loader(job, rank, 2)
        docs = list(dl.dataset.source.documents)
        assert docs == DOCS  # every rank lists the same documents, in file order ...
        seen.append([docs[i] for i in range(rank, len(docs), 2)])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(DOCS)
    # ... and packs only its own: rank 1's first window starts with DOCS[1].
    (first, _), = take(make_loader(text_job(str(tmp_path), 8, 1, text_field="body"), 1, 2), 1)
    assert first["input"][0, 1:].tolist() == list(DOCS[1].encode()[:7])


def test_shipped_sample_is_the_default_path():
    (batch, labels), = take(make_loader(text_job(None, seq_len=64, batch=2)), 1)
    assert batch["input"][0, 0].item() == 256 and labels.shape == (2, 64)


def test_resume_is_exact(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d * 3}) + "\n" for d in DOCS))
    job = text_job(str(tmp_path), seq_len=12, batch=2)
    straight = take(make_loader(job), 12)  # more than one epoch
    first = make_loader(job)
    it = iter(first)
    for _ in range(5):
        next(it)
    resumed = make_loader(job)
    resumed.load_state_dict(first.state_dict())
    for (a, la), (b, lb) in zip(take(resumed, 7), straight[5:]):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["doc_starts"], b["doc_starts"])
        assert torch.equal(la, lb)


@pytest.mark.parametrize("setup, words", [
    (lambda p: None, "does not exist"),
    (lambda p: (p.mkdir(), (p / "x.csv").write_text("a,b")), "no .txt, .jsonl or .parquet"),
    (lambda p: (p.mkdir(), (p / "x.jsonl").write_text('{"body": "t"}\n')), "no 'text' field"),
    (lambda p: (p.mkdir(), (p / "x.jsonl").write_text("not json\n")), "is not JSON"),
    (lambda p: (p.mkdir(), (p / "x.parquet").write_text("not parquet")), "not a readable parquet"),
])
def test_bad_local_paths_are_named(tmp_path, setup, words):
    path = tmp_path / "data"
    setup(path)
    with pytest.raises(DataConfigError, match=words):
        make_loader(text_job(str(path)))


def test_unknown_dataset_lists_the_known_ones():
    job = make_job_config("c5", tokenizer="bytes")
    with pytest.raises(DataConfigError, match="'c5' is not registered.*local_text.*mqar"):
        make_loader(job)
