"""Document sources and the packer that cuts their tokens into windows.

A source yields document texts for one DP rank and can save/restore its position. The
packer tokenizes each document as BOS + text + EOS, appends it to a token stream, and
cuts the stream into windows of seq_len + 1 tokens (input = window[:-1], labels =
window[1:], as torchtitan does), recording where each document starts.

Batch items: ({"input": [T] int64, "doc_starts": [T] bool}, labels [T] int64).
doc_starts is True at the first token of every document inside the window and always at
position 0 (each row starts from a fresh state). A label that would be the first token
of the next document is -100: nothing in the current document predicts it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info

IGNORE = -100
logger = logging.getLogger(__name__)


def strided_slot(dp_rank: int, dp_world_size: int) -> tuple[int, int]:
    """(first index, stride) of this reader among all DP ranks and loader worker processes.

    Each worker process of each rank reads every stride-th item, so that loader workers
    split a rank's share instead of each repeating it.
    """
    worker = get_worker_info()
    workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
    return dp_rank + dp_world_size * worker_id, dp_world_size * workers


class SequenceSource:
    """Random-access documents (a list, or an HF Dataset column); rank r of W takes r, r+W, ...."""

    def __init__(self, documents: Sequence[str], dp_rank: int, dp_world_size: int):
        self.documents = documents
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self._next: int | None = None  # None: at the start of an epoch
        self.epoch = 0

    def __iter__(self) -> Iterator[str]:
        first, stride = strided_slot(self.dp_rank, self.dp_world_size)
        if self._next is None:
            self._next = first
        while self._next < len(self.documents):
            text = self.documents[self._next]
            self._next += stride
            if text:  # filtered-out rows read as empty
                yield text

    def next_epoch(self) -> None:
        self.epoch += 1
        self._next = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next": self._next}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._next = None if state["next"] is None else int(state["next"])


class StreamSource:
    """Documents from a streaming HF IterableDataset of rows.

    `to_text(row)` gives a row's text, or None to skip the row. With a `joiner`, rows are
    fragments that it assembles into documents (WikiText), and the ranks take every W-th
    document; otherwise the dataset is expected to be split by rank already.
    """

    def __init__(self, rows, to_text: Callable[[dict], str | None], dp_rank: int = 0,
                 dp_world_size: int = 1, joiner=None):
        self.rows, self.to_text, self.joiner = rows, to_text, joiner
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.epoch = 0
        self._documents_seen = 0  # counts every joined document, to stride by rank

    def __iter__(self) -> Iterator[str]:
        for row in self.rows:
            text = self.to_text(row)
            if text is None:
                continue
            if self.joiner is None:
                yield text
                continue
            for document in self.joiner.push(text):
                yield from self._mine(document)
        if self.joiner is not None:
            for document in self.joiner.flush():
                yield from self._mine(document)

    def _mine(self, document: str) -> Iterator[str]:
        index = self._documents_seen
        self._documents_seen += 1
        if index % self.dp_world_size == self.dp_rank:
            yield document

    def next_epoch(self) -> None:
        self.epoch += 1
        self._documents_seen = 0
        if hasattr(self.rows, "set_epoch"):
            self.rows.set_epoch(self.epoch)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "rows": self.rows.state_dict(),
                 "documents_seen": self._documents_seen}
        if self.joiner is not None:
            state["joiner"] = self.joiner.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        if hasattr(self.rows, "set_epoch"):
            self.rows.set_epoch(self.epoch)
        self.rows.load_state_dict(state["rows"])
        self._documents_seen = int(state["documents_seen"])
        if self.joiner is not None:
            self.joiner.load_state_dict(state["joiner"])


def describe_tokenizer(tokenizer) -> str:
    """A short identity of a tokenizer: class, encoding name or vocabulary hash, and size.

    HF tokenizers get a hash of their vocabulary: two of them (say Llama-2's and Mistral's)
    can share a size while mapping ids to different strings.
    """
    kind = type(tokenizer).__name__
    encoding = getattr(getattr(tokenizer, "encoding", None), "name", None)
    if encoding:
        kind += f"({encoding})"
    elif hasattr(tokenizer, "get_vocab"):
        items = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        kind += f"(vocab sha1 {hashlib.sha1(repr(items).encode()).hexdigest()[:12]})"
    return f"{kind}, vocab {tokenizer.get_vocab_size()}"


class PackedTextDataset(IterableDataset, Stateful):
    """Tokenizes a source's documents and packs them into windows with document starts."""

    def __init__(self, source, tokenizer, seq_len: int, infinite: bool, name: str = "text"):
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.infinite, self.name = seq_len, infinite, name
        # The unread part of the token stream: tokens[cursor:], and the stream offsets
        # (absolute, in the same list) where documents begin.
        self._tokens: list[int] = []
        self._starts: list[int] = []
        self._cursor = 0

    def _append_document(self, text: str) -> None:
        ids = self.tokenizer.encode(text, add_bos=True, add_eos=True)
        if ids:
            self._starts.append(len(self._tokens))
            self._tokens.extend(ids)

    def _has_window(self) -> bool:
        return len(self._tokens) - self._cursor >= self.seq_len + 1

    def _cut_window(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        begin, end = self._cursor, self._cursor + self.seq_len + 1
        window = torch.tensor(self._tokens[begin:end], dtype=torch.long)
        starts_in_window = [s - begin for s in self._starts if begin <= s < end]
        is_start = torch.zeros(self.seq_len + 1, dtype=torch.bool)
        is_start[starts_in_window] = True

        labels = window[1:].clone()
        labels[is_start[1:]] = IGNORE
        doc_starts = is_start[:-1].clone()
        doc_starts[0] = True
        self._consume(end)
        return {"input": window[:-1], "doc_starts": doc_starts}, labels

    def _consume(self, end: int) -> None:
        self._cursor = end
        self._starts = [s for s in self._starts if s >= end]
        # Drop the consumed prefix now and then, not at every window: slicing a long
        # document's tokens after each window would cost O(document length) each time.
        if self._cursor > 4 * (self.seq_len + 1) and self._cursor * 2 > len(self._tokens):
            self._tokens = self._tokens[self._cursor:]
            self._starts = [s - self._cursor for s in self._starts]
            self._cursor = 0

    def __iter__(self):
        whole_epoch = False  # this pass started at the beginning of an epoch
        while True:
            documents = 0
            for text in self.source:
                documents += 1
                self._append_document(text)
                while self._has_window():
                    yield self._cut_window()
            if not self.infinite:
                logger.warning("dataset %s: out of data", self.name)
                return
            if whole_epoch and documents == 0:
                # Looping again would spin forever without yielding anything.
                raise ValueError(
                    f"dataset {self.name}: no documents for this DP rank (empty files, or a "
                    "[bayes_data] redpajama_sets filter that matches nothing in its share)"
                )
            logger.warning("dataset %s: starting epoch %d", self.name, self.source.epoch + 1)
            self.source.next_epoch()
            whole_epoch = True

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self._tokens[self._cursor:],
                "starts": [s - self._cursor for s in self._starts],
                "source": self.source.state_dict(),
                "tokenizer": describe_tokenizer(self.tokenizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, current = state.get("tokenizer"), describe_tokenizer(self.tokenizer)
        if saved is not None and saved != current:
            # The saved token buffer (and the model) speak another vocabulary.
            raise ValueError(
                f"dataset {self.name}: the checkpoint was written with tokenizer {saved}, this "
                f"job uses {current}; use the checkpoint's tokenizer settings ([bayes_data] "
                "tokenizer / tiktoken_encoding, model.hf_assets_path)"
            )
        self._tokens, self._starts = list(state["tokens"]), list(state["starts"])
        self._cursor = 0
        self.source.load_state_dict(state["source"])
