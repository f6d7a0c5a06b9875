"""The validator: torchtitan's loss plus accuracy on the labelled (MQAR query) positions."""

import contextlib
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchtitan.components.loss import cross_entropy_loss

from titan_bayes.data import build_tokenizer, build_validator
from titan_bayes.data import validate as validate_module
from titan_bayes.data.loader import build_validation_dataloader
from titan_bayes.data.testing import make_job_config

VOCAB, PAIRS, SEQ = 64, 4, 64


class RecallModel(torch.nn.Module):
    """Answers each position with the value bound to its token in the key-value context,
    except for keys in `wrong_keys`, and adds input-dependent noise to the logits."""

    def __init__(self, wrong_keys=()):
        super().__init__()
        self.wrong_keys = set(wrong_keys)

    def forward(self, tokens, doc_starts):
        assert doc_starts.dtype == torch.bool and doc_starts.shape == tokens.shape
        gen = torch.Generator().manual_seed(int(tokens.sum()))
        logits = torch.randn(*tokens.shape, VOCAB, generator=gen)
        for b in range(tokens.shape[0]):
            row = tokens[b].tolist()
            bound = dict(zip(row[0:2 * PAIRS:2], row[1:2 * PAIRS:2]))
            for t, tok in enumerate(row):
                if tok in bound:
                    answer = bound[tok] if tok not in self.wrong_keys else 0
                    logits[b, t, answer] += 20.0
        return logits


class Metrics:
    def __init__(self):
        self.ntokens_since_last_log = 0
        self.logged = []

    def log_validation(self, loss, step, extra_metrics=None):
        self.logged.append((step, loss, dict(extra_metrics or {})))


def make_validator(job, metrics):
    dims = SimpleNamespace(dp_enabled=False, dp_cp_enabled=False, pp_enabled=False, cp_enabled=False)
    return build_validator(job_config=job, dp_world_size=1, dp_rank=0, tokenizer=build_tokenizer(job),
                           parallel_dims=dims, loss_fn=cross_entropy_loss,
                           validation_context=contextlib.nullcontext,
                           maybe_enable_amp=contextlib.nullcontext(), metrics_processor=metrics)


def oracle(job, model, steps):
    """Loss and accuracy computed directly from the validation batches."""
    loader = build_validation_dataloader(1, 0, build_tokenizer(job), job)
    losses, correct, total = [], 0, 0
    for i, (inputs, labels) in enumerate(loader):
        if i == steps:
            break
        logits = model(inputs["input"], inputs["doc_starts"])
        mask = labels != -100
        losses.append(F.cross_entropy(logits[mask], labels[mask]).item())
        correct += (logits.argmax(-1)[mask] == labels[mask]).sum().item()
        total += mask.sum().item()
    return sum(losses) / len(losses), correct / total


@pytest.mark.parametrize("wrong_keys", [(), tuple(range(1, 17))])
def test_validation_logs_loss_and_query_accuracy(monkeypatch, wrong_keys):
    monkeypatch.setattr(validate_module.utils, "device_type", "cpu")
    job = make_job_config("mqar", seq_len=SEQ, batch=4, tokenizer="mqar", mqar_vocab_size=VOCAB,
                          mqar_num_kv_pairs=PAIRS, mqar_validation_examples=32)
    job.validation.steps = 3
    model, metrics = RecallModel(wrong_keys), Metrics()
    validator = make_validator(job, metrics)
    validator.validate([model], step=10)
    validator.validate([model], step=20)
    (s1, loss1, extra1), (s2, loss2, extra2) = metrics.logged
    want_loss, want_acc = oracle(job, model, steps=3)
    assert (s1, s2) == (10, 20)
    assert loss1 == pytest.approx(want_loss, rel=1e-5)
    assert extra1["validation_metrics/accuracy"] == pytest.approx(want_acc, abs=1e-12)
    # Every validation reads the same batches.
    assert (loss2, extra2) == (loss1, extra1)
    if not wrong_keys:
        assert want_acc == 1.0
    else:
        assert 0.0 < want_acc < 1.0


def _uneven_worker(rank, store_file, data_dir, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        validate_module.utils.device_type = "cpu"
        mesh = init_device_mesh("cpu", (2,))
        dims = SimpleNamespace(dp_enabled=True, dp_cp_enabled=True, pp_enabled=False, cp_enabled=False,
                               get_mesh=lambda name: mesh, get_optional_mesh=lambda name: mesh)
        job = make_job_config("local_text", seq_len=16, batch=1, dataset_path=data_dir, tokenizer="bytes")
        job.validation.steps = -1
        metrics = Metrics()
        validator = build_validator(job_config=job, dp_world_size=2, dp_rank=rank,
                                    tokenizer=build_tokenizer(job), parallel_dims=dims,
                                    loss_fn=cross_entropy_loss, validation_context=contextlib.nullcontext,
                                    maybe_enable_amp=contextlib.nullcontext(), metrics_processor=metrics)
        model = CountingModel()
        validator.validate([model], step=1)
        total = sum(1 for _ in build_validation_dataloader(2, rank, build_tokenizer(job), job))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"forwards": model.calls, "batches": total, "loss": metrics.logged[0][1]}, f)
    finally:
        dist.destroy_process_group()


class CountingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, tokens, doc_starts):
        self.calls += 1
        return torch.zeros(*tokens.shape, 259)


def test_uneven_dp_ranks_stop_validation_together(tmp_path):
    """validation.steps = -1 with ranks holding different numbers of batches: both stop at
    the smaller count instead of one waiting forever in a collective."""
    import torch.multiprocessing as mp

    docs = ["x" * 200, "y" * 20, "z" * 200, "w" * 20]  # rank 0 gets the long ones
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_uneven_worker, args=(r, str(tmp_path / "store"), str(tmp_path), str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, "validation hung"
    assert all(p.exitcode == 0 for p in procs)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["batches"] > r1["batches"] > 0
    assert r0["forwards"] == r1["forwards"] == r1["batches"]
    assert r0["loss"] == pytest.approx(r1["loss"]) == pytest.approx(math.log(259))
