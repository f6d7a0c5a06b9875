"""A 2-layer bayes_lm learns small MQAR through the launcher (CPU, fixed step budget).

Setting: 4 key-value pairs in 64 tokens, a 64-token vocabulary (keys 1..31, values 32..63),
random filler, queries placed by Zoology's power law. Accuracy is measured by the data
package's validator on the queried positions of 400 held-out examples, at the end of training.
Chance is 1/32; the model must reach 95%.
"""

from __future__ import annotations

import os

import pytest

from test_train_support import REPO, read_losses, read_scalars, run_job

STEPS = 300


@pytest.mark.slow
def test_two_layer_bayes_lm_learns_mqar(tmp_path):
    dump = tmp_path / "mqar"
    run_job([
        "--job.config_file", os.path.join(REPO, "train_configs", "mqar.toml"),
        "--job.dump_folder", str(dump),
        "--model.name", "bayes_lm", "--model.flavor", "mqar",
        "--training.seq_len", "64", "--validation.seq_len", "64",
        "--bayes_data.mqar_vocab_size", "64", "--bayes_data.mqar_num_kv_pairs", "4",
        "--bayes_data.mqar_validation_examples", "400",
        "--training.local_batch_size", "64", "--validation.local_batch_size", "100",
        "--training.steps", str(STEPS), "--validation.freq", str(STEPS),
        "--metrics.log_freq", "100",
        "--optimizer.lr", "3e-3", "--optimizer.weight_decay", "0.0",
        "--lr_scheduler.warmup_steps", "20", "--lr_scheduler.decay_type", "linear",
        "--lr_scheduler.min_lr_factor", "1.0",
        "--training.mixed_precision_param", "float32",
        "--bayes.chunk_size", "32", "--bayes.no-diagnostics",
        "--checkpoint.no-enable",
    ], timeout=900)
    assert read_losses(dump)[STEPS] < 0.5
    accuracy = read_scalars(dump, "validation_metrics/accuracy")["validation_metrics/accuracy"]
    assert accuracy[STEPS] >= 0.95, accuracy
