"""Validation: torchtitan's loss plus accuracy on the labelled positions.

For MQAR the labelled positions are exactly the queries, so the accuracy is MQAR
accuracy; for text it is next-token accuracy. Every validation reads the same batches:
the loader is rewound to its initial state first (torchtitan's own validator continues
where the previous validation stopped).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.validate import Validator
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools import utils
from torchtitan.tools.logging import logger

from titan_bayes.infra.parallelize import reshard_fsdp

from .loader import build_validation_dataloader


class BayesValidator(Validator):
    """torchtitan's Validator with our dataloader and an accuracy metric."""

    def __init__(self, job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, loss_fn,
                 validation_context, maybe_enable_amp, metrics_processor,
                 pp_schedule=None, pp_has_first_stage=None, pp_has_last_stage=None):
        # Not calling Validator.__init__: it would build torchtitan's text dataloader.
        self.job_config = job_config
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        self.validation_dataloader = build_validation_dataloader(
            dp_world_size, dp_rank, tokenizer, job_config,
            infinite=job_config.validation.steps != -1,
        )
        self._initial_state = self.validation_dataloader.state_dict()

    def post_dataloading_process(self, input_dict, labels, model_parts):
        inputs = input_dict["input"]
        extra_inputs = {k: v for k, v in input_dict.items() if k != "input"}
        extra_kwargs = {}
        model = model_parts[0]
        # As the Trainer does: only flex/varlen attention models build masks here.
        if getattr(getattr(model, "model_args", None), "attn_type", "sdpa") in ("flex", "varlen"):
            extra_kwargs["attention_masks"] = model.get_attention_masks(
                input_batch=inputs, tokenizer=self.tokenizer, extra_inputs=extra_inputs)
        return inputs, labels, extra_inputs, extra_kwargs

    def _forward_loss(self, model_parts, inputs, labels, extra_inputs, extra_kwargs):
        """(summed loss, logits or None). Logits are not available under pipeline parallel."""
        if self.parallel_dims.pp_enabled:
            with self.validation_context():
                losses = [] if self.pp_has_last_stage else None
                targets = labels if self.pp_has_last_stage else None
                stage_inputs = (inputs,) if self.pp_has_first_stage else ()
                stage_extra = extra_inputs if self.pp_has_first_stage else {}
                self.pp_schedule.eval(*stage_inputs, **stage_extra, **extra_kwargs,
                                      target=targets, losses=losses)
            device = utils.device_type
            if self.pp_has_last_stage:
                return torch.sum(torch.stack(losses)).to(device), None
            return torch.tensor([-1.0], device=device), None
        with self.validation_context(), self.maybe_enable_amp:
            logits = model_parts[0](inputs, **extra_inputs, **extra_kwargs)
            return self.loss_fn(logits, labels), logits

    def _batches_all_ranks_have(self, dp_mesh):
        """The validation batches, stopping at `validation.steps` or when any DP rank runs out.

        DP ranks may hold different numbers of batches (uneven shards); a rank that stopped
        early would leave the others waiting in a collective forever.
        """
        limit = self.job_config.validation.steps
        batches = iter(self.validation_dataloader)
        taken = 0
        while limit == -1 or taken < limit:
            batch = next(batches, None)
            if dp_mesh is not None:
                have = torch.tensor([0 if batch is None else 1], device=utils.device_type)
                torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN,
                                             group=dp_mesh.get_group())
                if have.item() == 0:
                    return
            if batch is None:
                return
            yield batch
            taken += 1

    @torch.no_grad()
    def validate(self, model_parts, step: int) -> None:
        for model in model_parts:
            model.eval()
        self.validation_dataloader.load_state_dict(self._initial_state)
        device = utils.device_type
        dp_mesh = self.parallel_dims.get_mesh("batch") if self.parallel_dims.dp_enabled else None
        step_losses = []
        correct = torch.zeros((), dtype=torch.int64, device=device)
        labelled = torch.zeros((), dtype=torch.int64, device=device)
        for input_dict, labels in self._batches_all_ranks_have(dp_mesh):
            self.metrics_processor.ntokens_since_last_log += labels.numel()
            input_dict = {k: v.to(device) for k, v in input_dict.items()}
            labels = labels.to(device)
            inputs, labels, extra_inputs, extra_kwargs = self.post_dataloading_process(
                input_dict, labels, model_parts)
            mask = labels != IGNORE_INDEX
            local_tokens = mask.sum()
            global_tokens = (dist_utils.dist_sum(local_tokens, dp_mesh, None)
                             if dp_mesh is not None else local_tokens.float())
            loss_sum, logits = self._forward_loss(model_parts, inputs, labels,
                                                  extra_inputs, extra_kwargs)
            step_losses.append(loss_sum.detach() / global_tokens)
            if logits is not None:
                if isinstance(logits, DTensor):  # tensor parallel: vocabulary-sharded logits
                    logits = logits.full_tensor()
                correct += ((logits.argmax(-1) == labels) & mask).sum()
                labelled += local_tokens
        if not step_losses:
            raise RuntimeError("validation read no batches: the validation dataset is empty")

        loss = torch.sum(torch.stack(step_losses)) / len(step_losses)
        if self.parallel_dims.dp_cp_enabled:
            loss = dist_utils.dist_sum(loss, self.parallel_dims.get_optional_mesh("loss"))
        else:
            loss = loss.item()
        extra = {}
        if not self.parallel_dims.pp_enabled:
            if dp_mesh is not None:
                correct_all = dist_utils.dist_sum(correct.float(), dp_mesh, None)
                labelled_all = dist_utils.dist_sum(labelled.float(), dp_mesh, None)
            else:
                correct_all, labelled_all = correct.item(), labelled.item()
            accuracy = correct_all / max(labelled_all, 1)
            extra["validation_metrics/accuracy"] = accuracy
            logger.info(f"validate step: {step:2}  accuracy (labelled positions): {accuracy:.4f}")
        self.metrics_processor.log_validation(loss=loss, step=step, extra_metrics=extra)
        for model in model_parts:
            reshard_fsdp(model)  # forward-only passes leave some FSDP units gathered
            model.train()


def build_validator(job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, loss_fn,
                    validation_context, maybe_enable_amp, metrics_processor=None,
                    pp_schedule=None, pp_has_first_stage=None, pp_has_last_stage=None):
    """torchtitan's build_validator_fn."""
    if metrics_processor is None:
        raise ValueError("build_validator needs the metrics processor to log validation metrics")
    return BayesValidator(job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, loss_fn,
                          validation_context, maybe_enable_amp, metrics_processor,
                          pp_schedule, pp_has_first_stage, pp_has_last_stage)
