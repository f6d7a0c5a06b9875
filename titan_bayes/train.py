"""Launcher: torchtitan's unmodified Trainer, on a GPU or (with cpu_patches) on a CPU.

    python -m titan_bayes.train --job.config_file train_configs/debug.toml
    torchrun --nproc_per_node=2 -m titan_bayes.train --job.config_file train_configs/debug.toml

Before the Trainer touches anything (process groups, the dump folder), the job is checked:
spec, flavor, [bayes] values, layout letters, data path, kernel limits. A bad value ends the
run with one line `titan_bayes.train: error: ...` and exit status 2, and nothing is written.
"""

from __future__ import annotations

import os
import socket
import sys

from titan_bayes.cpu_patches import apply_cpu_patches, gpu_present

ERROR_PREFIX = "titan_bayes.train: error: "


class JobError(Exception):
    """A problem with the job's configuration or inputs (reported as one line)."""


def _with_custom_config(argv: list[str]) -> list[str]:
    """Use titan_bayes.config's JobConfig ([bayes], [bayes_data]) unless the job names another."""
    if any(a.split("=")[0] in ("--job.custom_config_module", "--job.custom-config-module") for a in argv):
        return argv
    config_file = None
    for i, a in enumerate(argv):
        key = a.split("=")[0]
        if key in ("--job.config_file", "--job.config-file"):
            config_file = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else None)
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise JobError(f"--job.config_file {config_file!r} does not exist")
        import tomllib

        try:
            with open(config_file, "rb") as f:
                toml = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise JobError(f"{config_file} is not valid TOML: {e}") from None
        if toml.get("job", {}).get("custom_config_module"):
            return argv
    return argv + ["--job.custom_config_module", "titan_bayes.config"]


def _single_process_env() -> None:
    """`python -m titan_bayes.train` without torchrun: a world of one."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def parse_config(argv: list[str]):
    from torchtitan.config import ConfigManager

    try:
        return ConfigManager().parse_args(_with_custom_config(argv))
    except ValueError as e:  # unknown keys in a TOML section
        raise JobError(str(e).strip().splitlines()[0] + " (check the key names of the TOML file)") from None
    except SystemExit as e:  # tyro reports unknown keys / bad types itself, then exits
        raise JobError("the configuration was rejected (unknown key or wrong type; see the message "
                       "above)") from e


def check_job(job_config) -> None:
    """Everything that can be checked without a process group; raises JobError."""
    from torchtitan.protocols.train_spec import get_train_spec

    import titan_bayes  # noqa: F401  (registers the specs)
    from titan_bayes.train_specs import SPEC_NAMES

    if job_config.experimental.custom_import:
        import importlib

        importlib.import_module(job_config.experimental.custom_import)
    name, flavor = job_config.model.name, job_config.model.flavor
    try:
        spec = get_train_spec(name)
    except ValueError:
        raise JobError(f"model.name = {name!r} is not a registered spec; titan_bayes provides "
                       f"{list(SPEC_NAMES)}") from None
    try:
        args = spec.model_args[flavor]
    except (KeyError, ValueError):
        raise JobError(f"model.flavor = {flavor!r} is unknown for {name}; available: "
                       f"{sorted(spec.model_args)}") from None
    for key in ("dataset_path",):
        path = getattr(job_config.training, key)
        if path and not os.path.exists(path):
            raise JobError(f"training.{key} = {path!r} does not exist; point it at a local file or folder")
    if job_config.validation.enable and job_config.validation.dataset_path \
            and not os.path.exists(job_config.validation.dataset_path):
        raise JobError(f"validation.dataset_path = {job_config.validation.dataset_path!r} does not exist")
    from titan_bayes import train_specs

    try:
        from titan_bayes.data import DATASETS
    except ImportError:
        DATASETS = None
    if spec.build_dataloader_fn is not train_specs.build_dataloader:
        DATASETS = None  # a spec with its own data: its builder checks its names
    roles = [("training", job_config.training)] + (
        [("validation", job_config.validation)] if job_config.validation.enable else [])
    for role, section in roles:
        if DATASETS is not None and section.dataset.lower() not in DATASETS:
            raise JobError(f"{role}.dataset = {section.dataset!r} is not registered; choose one of "
                           f"{sorted(DATASETS)}")
    try:
        args.update_from_config(job_config)
    except (ValueError, FileNotFoundError) as e:
        raise JobError(str(e)) from None
    _check_checkpoint_vocabulary(job_config, args)
    if getattr(job_config, "bayes", None) is not None and job_config.bayes.backend == "triton" \
            and not gpu_present():
        raise JobError("[bayes] backend = \"triton\" needs a CUDA GPU; use \"auto\" or \"chunked\" on a CPU")


def _checkpoint_to_load(job_config) -> str | None:
    """The DCP folder the Trainer will load, by torchtitan 0.2.2's rules: the newest (or
    `load_step`) step-N of the dump folder, else `initial_load_path` (unless it is in HF format)."""
    ckpt = job_config.checkpoint
    if not ckpt.enable:
        return None
    folder = os.path.join(job_config.job.dump_folder, ckpt.folder)
    steps = []
    if os.path.isdir(folder):
        steps = [int(d.split("-")[1]) for d in os.listdir(folder)
                 if d.startswith("step-") and d.split("-")[1].isdigit()]
    if steps:
        step = ckpt.load_step if ckpt.load_step > 0 else max(steps)
        return os.path.join(folder, f"step-{step}")
    if ckpt.initial_load_path and not ckpt.initial_load_in_hf:
        return ckpt.initial_load_path
    return None


def _check_checkpoint_vocabulary(job_config, args) -> None:
    """Refuse, before anything starts, a checkpoint whose embedding has another vocabulary
    (another tokenizer); DCP would otherwise fail mid-load with a size-mismatch traceback."""
    path = _checkpoint_to_load(job_config)
    if path is None or not os.path.isfile(os.path.join(path, ".metadata")):
        return
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(path).read_metadata().state_dict_metadata.get("tok_embeddings.weight")
    shape = tuple(getattr(saved, "size", ()))
    if len(shape) == 2 and shape[0] != args.vocab_size:
        tokenizer = getattr(getattr(job_config, "bayes_data", None), "tokenizer", "?")
        raise JobError(f"checkpoint {path} was trained with a vocabulary of {shape[0]} rows, but this job's "
                       f"tokenizer ([bayes_data] tokenizer = {tokenizer!r}) gives {args.vocab_size}; use the "
                       "tokenizer the checkpoint was trained with")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_cpu_patches()  # no-op when a GPU is present
    from torchtitan.tools.logging import init_logger, logger

    init_logger()
    try:
        job_config = parse_config(argv)
        check_job(job_config)
    except JobError as e:
        print(ERROR_PREFIX + str(e), file=sys.stderr, flush=True)
        return 2

    _single_process_env()
    import torch
    from torchtitan.train import Trainer

    # Files the Trainer may create before it fails (process-group traces): removed again on a
    # configuration error, so an existing dump folder is left as it was.
    dump = job_config.job.dump_folder
    created = [p for p in (os.path.join(dump, job_config.comm.save_traces_folder), dump)
               if not os.path.exists(p)]
    trainer = None
    try:
        trainer = Trainer(job_config)
        if job_config.checkpoint.create_seed_checkpoint:
            if int(os.environ["WORLD_SIZE"]) != 1:
                raise JobError("create a seed checkpoint with a single process (no sharding)")
            if not job_config.checkpoint.enable:
                raise JobError("--checkpoint.create_seed_checkpoint needs --checkpoint.enable")
    except (JobError, FileNotFoundError, ValueError) as e:
        # Data and config problems found while the Trainer is built (e.g. a dataset the data
        # package cannot find): one line, no traceback. Training errors below keep theirs.
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for path in created:
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(ERROR_PREFIX + message, file=sys.stderr, flush=True)
        return 2
    try:
        if job_config.checkpoint.create_seed_checkpoint:
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info("Created seed checkpoint")
        else:
            trainer.train()
    except BaseException:
        trainer.close()
        raise
    trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
