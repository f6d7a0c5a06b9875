"""End-to-end training through the launcher on a CPU (gloo): the README job, resume, bad input.

Every job here is a real `python -m titan_bayes.train` process; losses are read back from the
TensorBoard events the Trainer writes (fp32 values, exact).
"""

from __future__ import annotations

import os
import shutil

import pytest

from test_train_support import REPO, read_losses, read_scalars, run_job

DEBUG = os.path.join(REPO, "train_configs", "debug.toml")


def test_debug_config_20_steps_loss_falls(tmp_path):
    dump = tmp_path / "debug"
    run_job(["--job.config_file", DEBUG, "--job.dump_folder", str(dump)])
    losses = read_losses(dump)
    assert sorted(losses) == list(range(1, 21))
    first, last5 = losses[1], sum(losses[s] for s in range(16, 21)) / 5
    assert last5 < first - 1.5, losses  # byte-level text: ln(256)≈5.5 → well below 4
    # the filter diagnostics reach TensorBoard for every Bayesian layer
    diag = read_scalars(dump, "filter/")
    for layer in range(4):
        for key in ("write_gain", "trace_P_over_K", "pred_variance"):
            values = diag[f"filter/layer{layer}/{key}"]
            assert len(values) == 20
            assert all(v == v and v >= 0 for v in values.values())  # finite, non-negative
            if key == "write_gain":
                assert all(0 < v < 1 for v in values.values())
    # checkpoints at 10 and 20, full (resumable) at the last step
    assert sorted(os.listdir(dump / "checkpoint")) == ["step-10", "step-20"]


def _resume_args(dump, steps=6):
    return ["--job.config_file", DEBUG, "--job.dump_folder", str(dump),
            "--training.steps", str(steps), "--checkpoint.interval", "3",
            "--validation.no-enable", "--lr_scheduler.warmup_steps", "2"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_is_bit_identical(tmp_path, nproc):
    # nproc 2: FSDP2 over two ranks, whose checkpoint needs every FSDP unit sharded again after
    # the forward-only diagnostics pass of the log step (infra/parallelize.py: reshard_fsdp).
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_job(_resume_args(full), nproc=nproc)
    losses = read_losses(full)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    # A fresh dump folder holding only the step-3 checkpoint of the first run.
    (resumed / "checkpoint").mkdir(parents=True)
    shutil.copytree(full / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    run_job(_resume_args(resumed) + ["--metrics.save_tb_folder", "tb_resumed"], nproc=nproc)
    again = read_losses(resumed, "tb_resumed")
    assert sorted(again) == [4, 5, 6], again  # it did resume at step 3
    for step in (4, 5, 6):
        assert again[step] == losses[step], (step, again[step], losses[step])


BAD_INPUTS = [
    (["--model.name", "bayes_transformer"], "model.name = 'bayes_transformer'"),
    (["--model.flavor", "7B"], "model.flavor = '7B'"),
    (["--bayes.layout", "BBQA"], "unknown letter(s) ['Q']"),
    (["--training.dataset_path", "/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--bayes.backend", "triton", "--bayes.head_k_dim", "512"], "head_k_dim = 512"),
    (["--bayes.mode", "kalman"], "mode = 'kalman'"),
    (["--training.dataset", "c4"], "training.dataset = 'c4'"),
]


@pytest.mark.parametrize("extra,needle", BAD_INPUTS, ids=[b[1][:24] for b in BAD_INPUTS])
def test_bad_input_one_error_line_and_dump_untouched(tmp_path, extra, needle):
    dump = tmp_path / "dump"
    (dump / "checkpoint" / "step-5").mkdir(parents=True)
    (dump / "checkpoint" / "step-5" / "marker").write_text("precious")
    before = sorted(str(p.relative_to(dump)) for p in dump.rglob("*"))
    proc = run_job(["--job.config_file", DEBUG, "--job.dump_folder", str(dump), *extra],
                   check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("titan_bayes.train: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert sorted(str(p.relative_to(dump)) for p in dump.rglob("*")) == before
    assert (dump / "checkpoint" / "step-5" / "marker").read_text() == "precious"


def test_checkpoint_with_another_vocabulary_is_refused(tmp_path):
    # Continued pretraining from a byte-tokenizer checkpoint with a cl100k tokenizer: refused
    # before anything starts, in one line, instead of DCP's size-mismatch traceback mid-load.
    source, target = tmp_path / "bytes", tmp_path / "cl100k"
    run_job(["--job.config_file", DEBUG, "--job.dump_folder", str(source), "--training.steps", "1",
             "--checkpoint.interval", "1", "--validation.no-enable"])
    proc = run_job(["--job.config_file", DEBUG, "--job.dump_folder", str(target),
                    "--checkpoint.initial_load_path", str(source / "checkpoint" / "step-1"),
                    "--bayes_data.tokenizer", "tiktoken"], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("titan_bayes.train: error:")]
    assert len(errors) == 1 and "vocabulary of 320 rows" in errors[0] and "100288" in errors[0], errors
    assert not target.exists()
