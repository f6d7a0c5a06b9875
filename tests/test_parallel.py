"""2-rank FSDP2 and 2-rank tensor parallel reproduce the 1-rank losses (CPU, gloo, fp32).

All runs start from one seed checkpoint (torchtitan's `create_seed_checkpoint`), and read a
synthetic dataset whose global batch per step is the same for any data-parallel degree
(tests/test_train_support.py), so the only difference between runs is the sharding. The
batches carry document starts, so the filter's document restarts run sharded too.
"""

from __future__ import annotations

import shutil

import pytest

from test_train_support import read_losses, run_job

CONFIG = """
[job]
dump_folder = "unused"
custom_config_module = "titan_bayes.config"
[experimental]
custom_import = "test_train_support"
[model]
name = "{spec}_synth"
flavor = "debugmodel"
[bayes]
chunk_size = 16
[optimizer]
name = "AdamW"
lr = 3e-3
[lr_scheduler]
warmup_steps = 2
[training]
local_batch_size = 4
seq_len = 64
steps = 5
mixed_precision_param = "float32"
mixed_precision_reduce = "float32"
[parallelism]
data_parallel_shard_degree = -1
[activation_checkpoint]
mode = "none"
[metrics]
log_freq = 1
enable_tensorboard = true
[checkpoint]
enable = true
[debug]
seed = 0
"""

RUNS = {
    "fsdp2": (2, ["--training.local_batch_size", "2"]),  # same global batch of 4
    "tp2": (2, ["--parallelism.tensor_parallel_degree", "2",
                "--parallelism.data_parallel_shard_degree", "1"]),
}


@pytest.mark.parametrize("spec", ["bayes_lm", "bayes_hybrid"])
def test_two_rank_losses_match_one_rank(tmp_path, spec):
    config = tmp_path / "job.toml"
    config.write_text(CONFIG.format(spec=spec))
    base = ["--job.config_file", str(config)]
    seed = tmp_path / "seed"
    run_job(base + ["--job.dump_folder", str(seed), "--checkpoint.create_seed_checkpoint",
                    "--parallelism.data_parallel_shard_degree", "1"])

    def run(name, nproc, extra):
        dump = tmp_path / name
        shutil.copytree(seed / "checkpoint" / "step-0", dump / "checkpoint" / "step-0")
        run_job(base + ["--job.dump_folder", str(dump), *extra], nproc=nproc)
        losses = read_losses(dump)
        assert sorted(losses) == [1, 2, 3, 4, 5], (name, losses)
        return losses

    reference = run("one_rank", 1, [])
    assert reference[5] < reference[1] - 0.5  # it trains (so equal losses mean something)
    for name, (nproc, extra) in RUNS.items():
        losses = run(name, nproc, extra)
        for step in range(1, 6):
            rel = abs(losses[step] - reference[step]) / abs(reference[step])
            assert rel <= 1e-4, (name, step, losses[step], reference[step])
