"""Helpers for the training tests (no tests here): a synthetic data spec and a run helper.

`--experimental.custom_import test_train_support` (with tests/ on PYTHONPATH) registers
`<spec>_synth` for every titan_bayes spec: the real model, parallelize_fn, optimizer and loss,
with a small deterministic dataloader whose *global* batch of a step depends only on the step,
each data-parallel rank taking its slice. So 1-rank and 2-rank runs see exactly the same
tokens, which is what a loss-parity test needs (a real dataset shards by rank differently).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 256


class SyntheticLoader:
    """Markov-chain token streams: x[t+1] = perm[x[t]] with probability 0.9, else uniform.

    Learnable within a few steps (the loss falls), deterministic per step, sliced per rank.
    Every row also carries doc_starts (a document boundary at a random position in half of
    the rows) so the document path of the model is exercised.
    """

    def __init__(self, dp_world_size, dp_rank, batch_size, seq_len, seed=1234):
        self.world, self.rank = dp_world_size, dp_rank
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.step = 0
        self.perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))

    def _global_batch(self, step):
        g = torch.Generator().manual_seed(self.seed * 1000 + step)
        B, T = self.batch_size * self.world, self.seq_len + 1
        x = torch.empty(B, T, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (B,), generator=g)
        noise = torch.rand(B, T, generator=g) < 0.1
        rand = torch.randint(0, VOCAB, (B, T), generator=g)
        for t in range(1, T):
            x[:, t] = torch.where(noise[:, t], rand[:, t], self.perm[x[:, t - 1]])
        starts = torch.zeros(B, T - 1, dtype=torch.bool)
        cut = torch.randint(1, T - 1, (B,), generator=g)
        has_cut = torch.arange(B) % 2 == 1
        starts[has_cut, cut[has_cut]] = True
        return x, starts

    def __iter__(self):
        while True:
            x, starts = self._global_batch(self.step)
            self.step += 1
            rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            x, starts = x[rows], starts[rows]
            yield {"input": x[:, :-1], "doc_starts": starts}, x[:, 1:].clone()

    def state_dict(self):
        return {f"synthetic_step_rank{self.rank}": self.step}

    def load_state_dict(self, state):
        self.step = state[f"synthetic_step_rank{self.rank}"]


class _Tokenizer:
    def get_vocab_size(self):
        return VOCAB


def _build_loader(dp_world_size, dp_rank, tokenizer, job_config, infinite=True):
    return SyntheticLoader(dp_world_size, dp_rank, job_config.training.local_batch_size,
                           job_config.training.seq_len)


def _register():
    import torchtitan.protocols.train_spec as registry

    from titan_bayes.train_specs import SPEC_NAMES, make_train_spec

    for name in SPEC_NAMES:
        if f"{name}_synth" not in registry._extra_train_specs:
            registry.register_train_spec(
                f"{name}_synth",
                make_train_spec(name, dataloader_fn=_build_loader, tokenizer_fn=lambda job_config: _Tokenizer()))


_register()


# ---------------------------------------------------------------------------------------------
# Running jobs

def run_job(args, nproc=1, env=None, timeout=300, check=True):
    """Run the launcher (under torchrun when nproc > 1); return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "tests"), REPO,
                                              full_env.get("PYTHONPATH", "")])
    if nproc > 1:  # two processes on a small machine: one thread each, no oversubscription
        full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    if nproc == 1:
        cmd = [sys.executable, "-m", "titan_bayes.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
               "-m", "titan_bayes.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stderr tail ---\n{proc.stderr[-6000:]}")
    return proc


def read_losses(dump_folder, tb_folder="tb"):
    """step -> global average loss, from the TensorBoard events the Trainer wrote (fp32 exact)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for run_dir in sorted(glob.glob(os.path.join(dump_folder, tb_folder, "*"))):
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        if "loss_metrics/global_avg_loss" in acc.Tags()["scalars"]:
            for event in acc.Scalars("loss_metrics/global_avg_loss"):
                losses[event.step] = event.value
    return losses


def read_scalars(dump_folder, prefix, tb_folder="tb"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for run_dir in sorted(glob.glob(os.path.join(dump_folder, tb_folder, "*"))):
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(prefix):
                out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out
