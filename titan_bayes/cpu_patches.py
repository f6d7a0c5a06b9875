"""Running torchtitan 0.2.2's Trainer on a machine without a GPU (the plugin's one patch module).

torchtitan 0.2.2 assumes an accelerator: with none present it still picks "cuda". Four small
changes make the unmodified Trainer train on a CPU with gloo, for 1 and 2 processes (FSDP2,
tensor parallel, checkpoint save/resume, TensorBoard). They are applied by the launcher
(`python -m titan_bayes.train`) only when no GPU is present; on a GPU nothing is touched.

1. Device type. torchtitan asks `torch._utils._get_available_device_type()` once, at import
   of torchtitan.tools.utils, falls back to "cuda" and copies the answer into a few modules.
   We make torch answer "cpu" and correct the copies already taken, so the Trainer builds
   `torch.device("cpu")`, uses `torch.cpu` as its device module and gloo as its backend.
2. Memory statistics. The metrics code asks the device module for its name, total memory
   and allocator statistics; `torch.cpu` has none of these. We add stand-ins (the machine's
   RAM as capacity, empty statistics), so memory columns read 0 instead of crashing.
3. Process-group timeouts. After step 1 torchtitan shortens the timeouts behind a barrier
   that passes `device_ids`, which gloo rejects. We replace that helper with a plain barrier
   followed by the same timeout change.
4. FSDP reductions. FSDP2 reduces gradients with PREMUL_SUM, which gloo lacks. With the
   divide factor of 1.0 that the Trainer needs anyway, a plain SUM is the same reduction:
   `titan_bayes.infra.parallelize.apply_fsdp` forces it when its mesh is on the CPU (the
   change lives there because it is a per-module setting made while sharding).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

_applied = False


def gpu_present() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def apply_cpu_patches() -> bool:
    """Apply changes 1–3 if no GPU is present (idempotent). Returns whether they are active."""
    global _applied
    if _applied:
        return True
    if gpu_present():
        return False

    # 1. Device type "cpu" everywhere torchtitan looked it up.
    import torch._utils

    torch._utils._get_available_device_type = lambda: "cpu"
    import torchtitan.components.metrics as tt_metrics
    import torchtitan.distributed.parallel_dims as tt_parallel_dims
    import torchtitan.distributed.utils as tt_dist_utils
    import torchtitan.tools.profiling as tt_profiling
    import torchtitan.tools.utils as tt_utils

    for module in (tt_utils, tt_metrics, tt_parallel_dims, tt_dist_utils, tt_profiling):
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = torch.cpu

    # 2. Memory statistics on torch.cpu.
    class _Properties:
        def __init__(self):
            try:
                self.total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):
                self.total_memory = 1 << 34
            self.name = "cpu"

    torch.cpu.get_device_name = lambda device=None: "cpu"
    torch.cpu.get_device_properties = lambda device=None: _Properties()
    torch.cpu.reset_peak_memory_stats = lambda device=None: None
    torch.cpu.empty_cache = lambda: None
    torch.cpu.memory_stats = lambda device=None: {}

    # 3. gloo-compatible timeout change.
    def set_pg_timeouts(timeout: timedelta, parallel_dims) -> None:
        torch.distributed.barrier()
        groups = [mesh.get_group() for mesh in parallel_dims.get_all_one_dimensional_meshes().values()]
        for group in groups + [None]:
            torch.distributed.distributed_c10d._set_pg_timeout(timeout, group)

    tt_dist_utils.set_pg_timeouts = set_pg_timeouts

    # Not a torchtitan change, a CPU one: the filter's cumulative decays reach fp32 denormals
    # as the gates learn to forget, and x86 arithmetic on denormals is ~100× slower (seen as
    # steps slowing down 50× mid-run). They are below anything the model can resolve.
    torch.set_flush_denormal(True)
    _applied = True
    return True
