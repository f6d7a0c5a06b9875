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


def test_two_stage_pipeline_trains(tmp_path):
    """Pipeline parallel through torchtitan's pipeline_llm: 2 stages of 2 blocks each.

    A smoke test, not a parity test: the later stage does not receive doc_starts (torchtitan
    forwards extra inputs to the first stage only) and torchtitan 0.2.2's schedule sums
    rather than averages gradients over tokens, so losses differ from the 1-rank run.
    """
    config = tmp_path / "job.toml"
    config.write_text(CONFIG.format(spec="bayes_hybrid"))
    dump = tmp_path / "pp"
    run_job(["--job.config_file", str(config), "--job.dump_folder", str(dump),
             "--checkpoint.no-enable", "--parallelism.pipeline_parallel_degree", "2",
             "--parallelism.data_parallel_shard_degree", "1",
             "--parallelism.pipeline_parallel_microbatch_size", "2"], nproc=2)
    losses = read_losses(dump)
    assert sorted(losses) == [1, 2, 3, 4, 5], losses
    assert all(0 < v < 10 for v in losses.values()) and losses[5] < losses[1] - 0.3, losses


def test_activation_checkpointing_and_compile_keep_the_losses(tmp_path):
    """AC (full, selective per op) and per-block torch.compile (aot_eager: no C++ toolchain
    needed) recompute or trace the same fp32 math: the 1-rank losses must not move."""
    config = tmp_path / "job.toml"
    config.write_text(CONFIG.format(spec="bayes_hybrid"))
    base = ["--job.config_file", str(config), "--checkpoint.no-enable", "--training.steps", "3"]
    variants = {
        "plain": [],
        "ac_full": ["--activation_checkpoint.mode", "full"],
        "ac_selective": ["--activation_checkpoint.mode", "selective"],
        "compile": ["--compile.enable", "--compile.backend", "aot_eager"],
    }
    results = {}
    for name, extra in variants.items():
        dump = tmp_path / name
        run_job(base + ["--job.dump_folder", str(dump), *extra])
        results[name] = read_losses(dump)
    for name, losses in results.items():
        assert sorted(losses) == [1, 2, 3], (name, losses)
        for step in (1, 2, 3):
            rel = abs(losses[step] - results["plain"][step]) / results["plain"][step]
            assert rel <= 1e-5, (name, step, losses[step], results["plain"][step])


# ---------------------------------------------------------------------------------------------
# FSDP2 mixed precision keeps the per-head filter parameters in fp32

def _fsdp_dtype_worker():
    """Runs under torchrun (2 ranks, gloo): bf16 FSDP2, record the dtypes seen in forward."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import titan_bayes.cpu_patches  # noqa: F401
    from titan_bayes.infra.parallelize import apply_fsdp
    from titan_bayes.models.args import flavors_for
    from titan_bayes.models.model import BayesLM, HeadParams

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = BayesLM(flavors_for("bayes_lm")["debugmodel"])
    model.init_weights()
    apply_fsdp(model, mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32, pp_enabled=False)
    seen = {"head": set(), "proj": set()}
    for m in model.modules():
        if isinstance(m, HeadParams):
            m.register_forward_hook(lambda mod, inp, out: seen["head"].update(
                t.dtype for t in out if t is not None))
            # the gathered parameters themselves, not only the returned values
            m.register_forward_hook(lambda mod, inp, out: seen["head"].add(mod.A_log.dtype))
    model.layers["0"].attn.q_proj.register_forward_hook(
        lambda mod, inp, out: seen["proj"].add(mod.weight.dtype))
    tokens = torch.randint(0, 256, (2, 32))
    logits = model(tokens)
    logits.float().sum().backward()
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad.full_tensor()).all())
                   for p in model.parameters())
    result = (seen["head"] == {torch.float32} and seen["proj"] == {torch.bfloat16}
              and logits.dtype == torch.bfloat16 and grads_ok)
    if dist.get_rank() == 0:
        print(f"DTYPES head={seen['head']} proj={seen['proj']} logits={logits.dtype} grads_ok={grads_ok}")
        print("RESULT", "OK" if result else "FAIL")
    dist.destroy_process_group()


def test_fsdp_bf16_keeps_filter_head_params_fp32():
    import os
    import subprocess
    import sys

    from test_train_support import REPO

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
                           os.path.abspath(__file__), "--fsdp-dtype-worker"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "RESULT OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


if __name__ == "__main__":
    import sys

    if "--fsdp-dtype-worker" in sys.argv:
        _fsdp_dtype_worker()


def test_tensor_parallel_validation_reports_accuracy(tmp_path):
    # Under TP the output layer's logits are vocabulary-sharded DTensors; the validator's
    # accuracy must gather them (titan_bayes/data/validate.py) instead of failing.
    from test_train_support import REPO, read_scalars

    dump = tmp_path / "tp_val"
    run_job(["--job.config_file", f"{REPO}/train_configs/debug.toml", "--job.dump_folder", str(dump),
             "--training.steps", "2", "--validation.freq", "2", "--validation.steps", "2",
             "--checkpoint.no-enable", "--parallelism.tensor_parallel_degree", "2",
             "--parallelism.data_parallel_shard_degree", "1"], nproc=2)
    accuracy = read_scalars(dump, "validation_metrics/accuracy")["validation_metrics/accuracy"]
    assert accuracy and all(0.0 <= a <= 1.0 for a in accuracy.values())
