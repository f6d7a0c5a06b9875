"""All sharding of the layer-layout decoder, in one place.

Order (as in torchtitan's llama): tensor parallel → activation checkpointing → torch.compile
per block → FSDP2. Pipeline parallelism is torchtitan's `pipeline_llm`, which cuts the model
into stages and calls `parallelize_bayes` on each.

Tensor parallel shards *heads*. Every head of a B/D layer owns its memory (M, and P in the
Bayesian layer): giving a rank whole heads keeps each covariance on one rank and the filter
needs no communication at all. Projections into heads are colwise, the output projection
rowwise (sequence parallel in between blocks, like llama); per-head parameters and the
short-convolution channels are sharded along with their heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.tools.logging import logger

from titan_bayes.models.model import Attention, FilterMixer, HeadParams, ShortConv

# Selective AC: keep matmul and attention outputs, recompute the rest (torchtitan's llama list,
# minus what our model never calls).
_op_sac_save_list = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_attention_math.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.aten.max.default,
}


def parallelize_bayes(model: nn.Module, parallel_dims: ParallelDims, job_config) -> nn.Module:
    """The TrainSpec's parallelize_fn (signature fixed by torchtitan)."""
    if parallel_dims.cp_enabled:
        raise ValueError("context parallelism is not supported by titan_bayes models yet "
                         "(set parallelism.context_parallel_degree = 1)")
    if parallel_dims.tp_enabled:
        if job_config.training.seq_len % parallel_dims.tp:
            raise ValueError(f"training.seq_len = {job_config.training.seq_len} must be divisible by "
                             f"parallelism.tensor_parallel_degree = {parallel_dims.tp} (sequence parallel)")
        apply_tp(model, parallel_dims.get_mesh("tp"),
                 loss_parallel=not job_config.parallelism.disable_loss_parallel)

    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(model, job_config.activation_checkpoint, model_compile_enabled=compile_model,
                 op_sac_save_list=_op_sac_save_list, base_folder=job_config.job.dump_folder)
    if compile_model:
        apply_compile(model, job_config.compile.backend)

    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(
            model,
            parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            pp_enabled=parallel_dims.pp_enabled,
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
        logger.info("Applied FSDP2 to the model (per block; filter head parameters kept in fp32)")
    elif parallel_dims.dp_replicate_enabled:
        raise ValueError("pure DDP (data_parallel_replicate_degree > 1 without sharding) is not "
                         "supported; use data_parallel_shard_degree (FSDP2) instead")
    return model


# ---------------------------------------------------------------------------------------------
# Tensor parallel

def _shard_param(module: nn.Module, name: str, mesh: DeviceMesh, placement) -> None:
    param = getattr(module, name)
    if param is None:
        return
    module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [placement]),
                                                 requires_grad=param.requires_grad))


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    tp = tp_mesh.size()
    args = model.model_args
    letters = set(args.full_layout)
    if letters & set("BD") and args.n_heads % tp:
        raise ValueError(f"tensor parallel degree {tp} must divide the filter heads n_heads = {args.n_heads}")
    kv = args.attn_n_kv_heads or args.attn_n_heads
    if "A" in letters and (args.attn_n_heads % tp or kv % tp):
        raise ValueError(f"tensor parallel degree {tp} must divide attn_n_heads = {args.attn_n_heads} "
                         f"and attn_n_kv_heads = {kv}")

    # Embedding rows sharded, output sharded over the sequence; final norm sequence parallel;
    # output projection colwise over the vocabulary (loss parallel keeps the logits sharded).
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel()
    if model.output is not None:
        top_plan["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel)
    parallelize_module(model, tp_mesh, top_plan)

    for block in model.layers.values():
        mixer = block.attn
        plan = {
            "attn_norm": SequenceParallel(),
            # The mixer needs the whole sequence (convolutions and the recurrence run along
            # time): gather it; doc_starts is a plain replicated tensor.
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None),
                                       desired_input_layouts=(Replicate(), None)),
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        if isinstance(mixer, FilterMixer):
            # Per-head projections (decay input a, write strength b, output gate g): colwise,
            # which slices whole heads because heads are contiguous in the output features.
            plan.update({"attn.a_proj": ColwiseParallel(), "attn.b_proj": ColwiseParallel(),
                         "attn.g_proj": ColwiseParallel()})
        parallelize_module(block, tp_mesh, plan)

        if isinstance(mixer, FilterMixer):
            for conv in (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d):
                _shard_param(conv, "weight", tp_mesh, Shard(0))  # channels follow their heads
            for name in ("A_log", "dt_bias", "noise_log"):
                _shard_param(mixer.head_params, name, tp_mesh, Shard(0))
            # One norm weight shared by all heads: replicated; its gradient is summed over the
            # ranks' heads (model._local declares it Partial).
            _shard_param(mixer.o_norm, "weight", tp_mesh, Replicate())
        else:
            assert isinstance(mixer, Attention)
    logger.info(f"Applied tensor parallel (degree {tp}, heads sharded) to the model")


# ---------------------------------------------------------------------------------------------
# Compile

def apply_compile(model: nn.Module, backend: str) -> None:
    """torch.compile each block. Not fullgraph: the filter op reads document boundaries and a
    definiteness flag back to the host, and Triton kernels that are not registered custom ops
    break full graphs (platform notes)."""
    for layer_id, block in model.layers.named_children():
        model.layers.register_module(layer_id, torch.compile(block, backend=backend, fullgraph=False))
    logger.info("Compiled each block with torch.compile")


# ---------------------------------------------------------------------------------------------
# FSDP2

def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype, pp_enabled: bool, cpu_offload: bool = False,
               reshard_after_forward_policy: str = "default") -> None:
    """FSDP2 per block, mixed precision, with the per-head filter parameters kept in fp32.

    Each block's HeadParams module (A_log, dt_bias, learned noise) is its own FSDP unit with an
    fp32 policy; it is tiny (a few numbers per head), so it is not resharded after forward.
    Gradient division is off: the Trainer already divides the summed loss by the global token
    count, and FSDP's own 1/dp would scale gradients twice.
    """
    policy = {"default": not pp_enabled, "always": True, "never": False}
    if reshard_after_forward_policy not in policy:
        raise ValueError(f"parallelism.fsdp_reshard_after_forward = {reshard_after_forward_policy!r}; "
                         "use 'default', 'always' or 'never'")
    reshard = policy[reshard_after_forward_policy]
    config = {"mesh": dp_mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype,
                                                                   reduce_dtype=reduce_dtype)}
    fp32 = {"mesh": dp_mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32,
                                                                 reduce_dtype=torch.float32)}
    if cpu_offload:
        config["offload_policy"] = fp32["offload_policy"] = CPUOffloadPolicy()

    if model.tok_embeddings is not None:
        fully_shard(model.tok_embeddings, **config, reshard_after_forward=reshard)
    for block in model.layers.values():
        for module in block.modules():
            if isinstance(module, HeadParams):
                fully_shard(module, **fp32, reshard_after_forward=False)
        fully_shard(block, **config, reshard_after_forward=reshard)
    if model.norm is not None and model.output is not None:
        # The last layers are needed first in backward: keep them gathered (llama's choice).
        fully_shard([model.norm, model.output], **config,
                    reshard_after_forward=reshard_after_forward_policy == "always")
    fully_shard(model, **config)

    gloo = dp_mesh.device_type == "cpu"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if gloo:
                # CPU change 4 of the platform notes (see titan_bayes/cpu_patches.py): gloo has
                # no PREMUL_SUM; with a divide factor of 1.0 a plain SUM is the same reduction.
                module.set_force_sum_reduction_for_comms(True)


__all__ = ["parallelize_bayes", "apply_tp", "apply_compile", "apply_fsdp", "ShortConv"]


def reshard_fsdp(model: nn.Module) -> None:
    """Put every FSDP unit of `model` back into its sharded state.

    Units built with reshard_after_forward=False (the fp32 head parameters, norm + output)
    stay gathered after a forward that has no backward (filter diagnostics, validation). The
    optimizer and the distributed checkpointer look parameters up by identity, so they must
    find the sharded parameters registered again before the next optimizer step or save.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
