"""Synthetic multi-query associative recall (MQAR), after Zoology (Arora et al., 2023).

One example of length T:
    k1 v1 k2 v2 ... kN vN | filler ... k_i ... filler ... k_j ...
The first 2N tokens bind N distinct keys (from 1..V/2-1) to values (from V/2..V-1).
After that context every key is queried once, at position 2N + 2g for a gap g drawn
without replacement with P(g) proportional to (g + 1) ** (a - 1) (small a: queries sit
close to the context). The label at a query's position is the value bound to its key;
every other label is -100. Positions that are neither context nor query hold random
tokens (or 0).

Example i of a split is a pure function of (seed, split, i), so the data is
deterministic by seed, DP ranks can take strided slices of one global order, and
resuming needs only a position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from .packing import strided_slot

from .config import DataConfigError

IGNORE = -100
# Mixed into the seed so that train and validation are different streams of one seed.
SPLIT_IDS = {"train": 0, "validation": 1}


@dataclass(frozen=True)
class MQARSpec:
    vocab_size: int
    num_kv_pairs: int
    seq_len: int
    power_a: float = 0.01
    random_fill: bool = True

    def check(self) -> None:
        n, v, t = self.num_kv_pairs, self.vocab_size, self.seq_len
        if v // 2 - 1 < n:
            raise DataConfigError(
                f"MQAR: mqar_vocab_size = {v} leaves {v // 2 - 1} key ids for "
                f"mqar_num_kv_pairs = {n} distinct keys; raise the vocabulary or lower the pairs"
            )
        if self.query_slots < n:
            raise DataConfigError(
                f"MQAR: seq_len = {t} has room for {self.query_slots} queries after the "
                f"{2 * n}-token context, but mqar_num_kv_pairs = {n} need one each; "
                f"use seq_len >= {4 * n}"
            )

    @property
    def query_slots(self) -> int:
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    def gap_probabilities(self) -> np.ndarray:
        weights = np.arange(1, self.query_slots + 1, dtype=np.float64) ** (self.power_a - 1.0)
        return weights / weights.sum()


def make_example(spec: MQARSpec, seed: int, split: str, index: int,
                 gap_p: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [T], labels [T]) of example `index` of `split`."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    n, half = spec.num_kv_pairs, spec.vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=n, replace=False)
    values = rng.choice(np.arange(half, spec.vocab_size), size=n, replace=False)
    gaps = rng.choice(spec.query_slots, size=n, replace=False,
                      p=spec.gap_probabilities() if gap_p is None else gap_p)

    if spec.random_fill:
        tokens = rng.integers(0, spec.vocab_size, size=spec.seq_len)
    else:
        tokens = np.zeros(spec.seq_len, dtype=np.int64)
    tokens[0:2 * n:2] = keys
    tokens[1:2 * n:2] = values
    query_pos = 2 * n + 2 * gaps
    tokens[query_pos] = keys
    labels = np.full(spec.seq_len, IGNORE, dtype=np.int64)
    labels[query_pos] = values
    return tokens.astype(np.int64), labels


class MQARDataset(IterableDataset, Stateful):
    """Yields ({"input", "doc_starts"}, labels) for this DP rank's share of the examples.

    The global order of an epoch is a permutation of 0..size-1 (identity without
    shuffle); rank r takes positions r, r + W, r + 2W, ... so that W ranks with batch B/W
    together see exactly the examples one rank with batch B sees (loader worker
    processes split a rank's positions further).
    """

    def __init__(self, spec: MQARSpec, seed: int, split: str, size: int, dp_rank: int,
                 dp_world_size: int, shuffle: bool, infinite: bool):
        spec.check()
        if size < dp_world_size:
            raise DataConfigError(
                f"MQAR {split}: {size} examples cannot be shared by {dp_world_size} DP ranks"
            )
        self.spec, self.seed, self.split, self.size = spec, seed, split, size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.shuffle, self.infinite = shuffle, infinite
        self._gap_p = spec.gap_probabilities()
        self._epoch = 0
        self._position: int | None = None  # next position in the epoch's global order

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        # Shuffle streams are kept apart from example streams by the extra word.
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], self._epoch, 0x5EED])
        return rng.permutation(self.size)

    def __iter__(self):
        doc_starts = torch.zeros(self.spec.seq_len, dtype=torch.bool)
        doc_starts[0] = True  # each example is one document
        first, stride = strided_slot(self.dp_rank, self.dp_world_size)
        while True:
            order = self._epoch_order()
            if self._position is None:
                self._position = first
            while self._position < self.size:
                index = int(order[self._position])
                self._position += stride
                tokens, labels = make_example(self.spec, self.seed, self.split, index, self._gap_p)
                yield ({"input": torch.from_numpy(tokens), "doc_starts": doc_starts.clone()},
                       torch.from_numpy(labels))
            if not self.infinite:
                return
            self._epoch += 1
            self._position = None

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self._epoch = int(state["epoch"])
        self._position = None if state["position"] is None else int(state["position"])
