"""torchtitan TrainSpecs `bayes_lm`, `bayes_hybrid`, `gdn_lm`, `transformer_lm` (registered on import).

All four are the same decoder (models/model.py) with a different default layout; everything
else (optimizer, LR schedule, loss, pipeline split) is torchtitan's own. Data and tokenizer
builders come from titan_bayes.data and are imported when the Trainer calls them, so importing
titan_bayes never depends on the data package.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import build_optimizers
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec

from titan_bayes.infra.parallelize import parallelize_bayes, reshard_fsdp
from titan_bayes.models.args import SPEC_LAYOUTS, BayesModelArgs, flavors_for
from titan_bayes.models.model import BayesLM, collect_filter_diagnostics


class FreshFlavors(Mapping):
    """The flavor table of a spec; every lookup returns a fresh copy.

    The Trainer mutates the looked-up args in place (update_from_config); with shared objects
    a second Trainer in the same process (tests, notebooks) would inherit the first job's
    layout and vocabulary.
    """

    def __init__(self, flavors: dict[str, BayesModelArgs]):
        self._flavors = flavors

    def __getitem__(self, name: str) -> BayesModelArgs:
        if name not in self._flavors:
            raise ValueError(f"model.flavor = {name!r} is unknown; available flavors: "
                             f"{sorted(self._flavors)}")
        return copy.deepcopy(self._flavors[name])

    def __iter__(self):
        return iter(self._flavors)

    def __len__(self):
        return len(self._flavors)


def build_tokenizer(job_config):
    from titan_bayes.data import build_tokenizer as build

    return build(job_config)


def build_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite=True):
    from titan_bayes.data import build_dataloader as build

    return build(dp_world_size=dp_world_size, dp_rank=dp_rank, tokenizer=tokenizer,
                 job_config=job_config, infinite=infinite)


def build_validator(**kwargs):
    from titan_bayes.data import build_validator as build

    return build(**kwargs)


class BayesMetricsProcessor(MetricsProcessor):
    """torchtitan's metrics plus per-layer filter diagnostics at log steps.

    The model keeps a reference to the first row of its last training input; at a log step
    every rank re-runs it without gradients (collective: FSDP/TP gather parameters), and the
    B layers report mean write gain, trace(P)/K and mean predictive variance. Values are
    averaged over ranks (tensor-parallel ranks hold different heads).
    """

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        extra = dict(extra_metrics or {})
        extra.update(self._filter_diagnostics())
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)

    def _filter_diagnostics(self) -> dict[str, float]:
        bayes = getattr(self.job_config, "bayes", None)
        if bayes is not None and not bayes.diagnostics:
            return {}
        if not self.model_parts or len(self.model_parts) != 1 or self.parallel_dims.pp_enabled:
            return {}
        model = self.model_parts[0]
        last = getattr(model, "last_input", None)
        if last is None:
            return {}
        stats = collect_filter_diagnostics(model, *last)
        reshard_fsdp(model)  # the checkpoint that may follow needs the sharded parameters
        if stats and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            keys = sorted(stats)
            values = torch.tensor([stats[k] for k in keys], dtype=torch.float64,
                                  device=last[0].device)
            torch.distributed.all_reduce(values)  # SUM: gloo has no AVG
            values /= torch.distributed.get_world_size()
            stats = dict(zip(keys, values.tolist()))
        return stats


def build_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    return BayesMetricsProcessor(job_config, parallel_dims, tag)


def make_train_spec(name: str, dataloader_fn=None, tokenizer_fn=None, validator_fn=None) -> TrainSpec:
    return TrainSpec(
        model_cls=BayesLM,
        model_args=FreshFlavors(flavors_for(name)),
        parallelize_fn=parallelize_bayes,
        pipelining_fn=pipeline_llm,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=dataloader_fn or build_dataloader,
        build_tokenizer_fn=tokenizer_fn or build_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=validator_fn or build_validator,
        build_metrics_processor_fn=build_metrics_processor,
    )


SPEC_NAMES = tuple(SPEC_LAYOUTS)


def register_all() -> None:
    """Register the four specs once per process (importing titan_bayes twice, or through
    `experimental.custom_import` after the launcher, must not raise)."""
    import torchtitan.protocols.train_spec as registry

    for name in SPEC_NAMES:
        if name not in registry._extra_train_specs:
            register_train_spec(name, make_train_spec(name))


register_all()

__all__ = ["make_train_spec", "register_all", "SPEC_NAMES", "get_train_spec", "FreshFlavors"]
