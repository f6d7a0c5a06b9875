"""Text files into documents: WikiText article joining, .txt / .jsonl / .parquet readers."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

from .config import DataConfigError

# An article heading is " = Title = " with a single "=" on each side; section headings
# (" = = Section = = ") have two or more and stay inside their article.
_ARTICLE_HEADING = re.compile(r"^ = [^=].*[^=] = $|^ = [^=] = $")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def is_article_heading(row: str) -> bool:
    return bool(_ARTICLE_HEADING.match(row.rstrip("\n")))


class WikiTextJoiner:
    """Assembles one-line WikiText rows into articles; empty rows are dropped.

    push(row) returns the articles that the row completes (the previous one, when the
    row is a new heading); flush() returns the last one. Rows before the first heading
    form an article of their own.
    """

    def __init__(self):
        self._pending: list[str] = []

    def push(self, row: str) -> list[str]:
        if not row.strip():
            return []
        finished = []
        if is_article_heading(row) and self._pending:
            finished.append("".join(self._pending))
            self._pending = []
        self._pending.append(row)
        return finished

    def flush(self) -> list[str]:
        finished = ["".join(self._pending)] if self._pending else []
        self._pending = []
        return finished

    def state_dict(self) -> dict:
        return {"pending": list(self._pending)}

    def load_state_dict(self, state: dict) -> None:
        self._pending = list(state["pending"])


def join_wikitext(rows: Iterable[str]) -> list[str]:
    joiner = WikiTextJoiner()
    articles = []
    for row in rows:
        articles.extend(joiner.push(row))
    return articles + joiner.flush()


def split_text(text: str, how: str) -> list[str]:
    """One .txt file's documents: "file", "line", "blank_line" (paragraphs) or "wikitext"."""
    if how == "file":
        return [text] if text.strip() else []
    if how == "line":
        return [line for line in text.splitlines() if line.strip()]
    if how == "blank_line":
        return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    if how == "wikitext":
        return join_wikitext(text.splitlines(keepends=True))
    raise DataConfigError(f"text_split {how!r} is not known")


def list_text_files(path: str) -> list[str]:
    """The .txt / .jsonl / .parquet files at `path` (a file, or a folder searched recursively)."""
    if not os.path.exists(path):
        raise DataConfigError(
            f"dataset path {path!r} does not exist; set training.dataset_path (or "
            "validation.dataset_path) to a file or folder of .txt, .jsonl or .parquet files"
        )
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path) for name in names
        )
    chosen = [f for f in files if f.endswith(TEXT_SUFFIXES)]
    if not chosen:
        raise DataConfigError(
            f"no .txt, .jsonl or .parquet file at {path!r}; local_text reads those formats only"
        )
    return chosen


def read_documents(files: list[str], text_split: str, text_field: str) -> Iterator[str]:
    for file in files:
        if file.endswith(".txt"):
            with open(file, encoding="utf-8") as f:
                yield from split_text(f.read(), text_split)
        elif file.endswith(".jsonl"):
            yield from _jsonl_texts(file, text_field)
        else:
            yield from _parquet_texts(file, text_field)


def _jsonl_texts(file: str, text_field: str) -> Iterator[str]:
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataConfigError(f"{file} line {line_no} is not JSON: {err}") from err
            if not isinstance(record, dict) or text_field not in record:
                raise DataConfigError(
                    f"{file} line {line_no} has no {text_field!r} field; set "
                    "[bayes_data] text_field to the field that holds the text"
                )
            if record[text_field]:
                yield record[text_field]


def _parquet_texts(file: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataConfigError(f"{file} is not a readable parquet file: {err}") from err
    if text_field not in table.column_names:
        raise DataConfigError(
            f"{file} has no column {text_field!r} (columns: {table.column_names}); set "
            "[bayes_data] text_field to the column that holds the text"
        )
    yield from (t for t in table.column(text_field).to_pylist() if t)
