"""MQAR data: labels checked against the task's definition, determinism, splits, DP sharding."""

from collections import Counter

import numpy as np
import pytest
import torch

from titan_bayes.data import DataConfigError, build_dataloader, build_tokenizer
from titan_bayes.data.loader import build_validation_dataloader
from titan_bayes.data.mqar import MQARSpec, make_example
from titan_bayes.data.testing import make_job_config, take

VOCAB, PAIRS, SEQ = 64, 4, 64


def mqar_job(batch=4, seq_len=SEQ, **overrides):
    settings = dict(tokenizer="mqar", mqar_vocab_size=VOCAB, mqar_num_kv_pairs=PAIRS,
                    mqar_train_examples=256, mqar_validation_examples=64)
    settings.update(overrides)
    return make_job_config("mqar", seq_len=seq_len, batch=batch, **settings)


def loader(job, rank=0, world=1, validation=False):
    tokenizer = build_tokenizer(job)
    if validation:
        return build_validation_dataloader(world, rank, tokenizer, job)
    return build_dataloader(world, rank, tokenizer, job)


def check_example(tokens, labels, vocab, pairs):
    """The task's definition, checked directly on one sequence."""
    tokens, labels = tokens.tolist(), labels.tolist()
    context = 2 * pairs
    keys, values = tokens[0:context:2], tokens[1:context:2]
    assert len(set(keys)) == pairs, "keys in the context must be distinct"
    assert all(1 <= k < vocab // 2 for k in keys)
    assert all(vocab // 2 <= v < vocab for v in values)
    bound = dict(zip(keys, values))
    labelled = [t for t, y in enumerate(labels) if y != -100]
    assert len(labelled) == pairs, "one query per key"
    queried = []
    for t in labelled:
        assert t >= context and (t - context) % 2 == 0
        key = tokens[t]
        assert key in bound, f"position {t} queries {key}, which the context never bound"
        assert labels[t] == bound[key]
        queried.append(key)
    assert sorted(queried) == sorted(keys), "every key is queried exactly once"


def test_every_query_label_is_the_value_bound_to_its_key():
    for inputs, labels in take(loader(mqar_job()), 10):
        assert inputs["input"].shape == labels.shape == (4, SEQ)
        assert inputs["input"].dtype == torch.long and inputs["doc_starts"].dtype == torch.bool
        for row in range(4):
            check_example(inputs["input"][row], labels[row], VOCAB, PAIRS)
        # One example per row: a single document starting at column 0.
        assert inputs["doc_starts"][:, 0].all() and not inputs["doc_starts"][:, 1:].any()


def test_without_random_fill_non_query_positions_are_zero():
    (inputs, labels), = take(loader(mqar_job(mqar_random_fill=False)), 1)
    tokens = inputs["input"]
    filler = torch.ones_like(tokens, dtype=torch.bool)
    filler[:, : 2 * PAIRS] = False
    filler &= labels == -100
    assert (tokens[filler] == 0).all()


def test_deterministic_by_seed():
    first = take(loader(mqar_job(mqar_seed=7)), 5)
    again = take(loader(mqar_job(mqar_seed=7)), 5)
    other = take(loader(mqar_job(mqar_seed=8)), 5)
    for (a, la), (b, lb) in zip(first, again):
        assert torch.equal(a["input"], b["input"]) and torch.equal(la, lb)
    assert not torch.equal(first[0][0]["input"], other[0][0]["input"])


def all_inputs(job, validation):
    dl = loader(job, validation=validation)
    if not validation:
        size = job.bayes_data.mqar_train_examples
        batches = take(dl, size // job.training.local_batch_size)
    else:
        batches = list(dl)
    return [tuple(row.tolist()) for inputs, _ in batches for row in inputs["input"]]


def test_train_and_validation_are_disjoint_for_one_seed():
    job = mqar_job(mqar_seed=3)
    train = all_inputs(job, validation=False)
    validation = all_inputs(job, validation=True)
    assert len(set(train)) == 256 and len(validation) == 64 == len(set(validation))
    assert not set(train) & set(validation)


def test_validation_is_finite_and_unshuffled():
    job = mqar_job()
    first, second = all_inputs(job, True), all_inputs(job, True)
    assert first == second and len(first) == 64


def test_dp_ranks_split_the_one_rank_batch():
    """Two ranks at batch 2 together see, each step, exactly the one-rank batch of 4."""
    one = take(loader(mqar_job(batch=4)), 6)
    rank0 = take(loader(mqar_job(batch=2), rank=0, world=2), 6)
    rank1 = take(loader(mqar_job(batch=2), rank=1, world=2), 6)
    for step in range(6):
        whole = Counter(tuple(r.tolist()) for r in one[step][0]["input"])
        part0 = Counter(tuple(r.tolist()) for r in rank0[step][0]["input"])
        part1 = Counter(tuple(r.tolist()) for r in rank1[step][0]["input"])
        assert not part0 & part1
        assert part0 + part1 == whole


def test_train_epochs_reshuffle_the_same_examples():
    job = mqar_job(batch=8, mqar_train_examples=32)
    batches = take(loader(job), 8)  # two epochs of 4 batches
    epoch = lambda bs: [tuple(r.tolist()) for b, _ in bs for r in b["input"]]
    first, second = epoch(batches[:4]), epoch(batches[4:])
    assert sorted(first) == sorted(second) and first != second


def test_resume_gives_the_same_next_batches():
    job = mqar_job(batch=4, mqar_train_examples=40)  # resume crosses an epoch boundary
    straight = take(loader(job), 16)
    first = loader(job)
    it = iter(first)
    for _ in range(9):
        next(it)
    state = first.state_dict()
    resumed = loader(job)
    resumed.load_state_dict(state)
    for (a, la), (b, lb) in zip(take(resumed, 7), straight[9:16]):
        assert torch.equal(a["input"], b["input"]) and torch.equal(la, lb)


def test_power_law_puts_queries_near_the_context():
    def mean_gap(power_a):
        spec = MQARSpec(VOCAB, PAIRS, 256, power_a)
        gaps = []
        for i in range(300):
            _, labels = make_example(spec, 0, "train", i)
            gaps += [(t - 2 * PAIRS) // 2 for t in np.flatnonzero(labels != -100)]
        return np.mean(gaps)

    uniform = mean_gap(1.0)
    slots = (256 - 2 * PAIRS) // 2
    assert abs(uniform - (slots - 1) / 2) < 0.1 * slots  # uniform placement: the middle
    assert mean_gap(0.01) < 0.6 * uniform


@pytest.mark.parametrize("overrides, seq_len, words", [
    (dict(mqar_num_kv_pairs=16), 32, "seq_len >= 64"),
    (dict(mqar_vocab_size=8, mqar_num_kv_pairs=4, ), 64, "key ids"),
    (dict(tokenizer="bytes", mqar_vocab_size=1000), 64, "exceeds the tokenizer"),
    (dict(mqar_power_a=0.0), 64, "mqar_power_a"),
])
def test_bad_mqar_settings_are_named(overrides, seq_len, words):
    with pytest.raises(DataConfigError, match=words):
        loader(mqar_job(seq_len=seq_len, **overrides))
