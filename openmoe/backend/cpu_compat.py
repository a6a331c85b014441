"""Let colossalai 0.5.0's MoeHybridParallelPlugin (EP + ZeRO-1 + pipeline) and its MoE checkpoint IO run on a
CPU-only machine over gloo, so that multi-process tests can run in CI.

    from openmoe.backend.cpu_compat import apply_cpu_patches
    apply_cpu_patches()          # in every rank, before colossalai.launch* and before building the plugin/booster

On a machine with CUDA this does nothing. Each patch below covers one measured failure (see
shared/notes/colossalai-0.5.0-on-cpu.md) and nothing else; all of them target colossalai==0.5.0 internals, so the
colossalai pin and this file move together. A CPU pass proves the parallel arithmetic, not GPU stream behaviour:
streams and events become no-ops here because CPU kernels run synchronously on the calling thread.
"""

import contextlib
import functools
import resource

import torch
import torch.distributed as dist

__all__ = ["apply_cpu_patches"]

_applied = False


class _NullStream:
    """Stands in for a CUDA stream: CPU work is already ordered, so waiting and syncing have nothing to do."""

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    """Stands in for a CUDA event (recorded work is complete as soon as the CPU call returns)."""

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


@contextlib.contextmanager
def _cuda_calls_stay_on_cpu():
    """Within the block, `tensor.cuda()` returns the tensor itself instead of raising on a CPU-only build."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _keep_on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_calls_stay_on_cpu():
            return fn(*args, **kwargs)

    return wrapper


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _patch_cpu_accelerator() -> None:
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    nothing = lambda self, *args, **kwargs: None  # noqa: E731
    # zero/low_level/bookkeeping/bucket_store.py:22 BucketStore.__init__ calls Stream() unconditionally, and
    # zero/low_level/low_level_optim.py:345-349 _run_reduction calls current_stream()/stream(); CpuAccelerator raises.
    CpuAccelerator.Stream = lambda self, *args, **kwargs: _NullStream()
    CpuAccelerator.current_stream = lambda self, device=None: _NullStream()
    CpuAccelerator.default_stream = lambda self, device=None: _NullStream()
    CpuAccelerator.stream = lambda self, stream_: contextlib.nullcontext()
    CpuAccelerator.set_stream = nothing
    CpuAccelerator.Event = lambda self, *args, **kwargs: _NullEvent()
    # low_level_optim.py:470/492 backward, checkpoint_io/utils.py:830 and utils/timer.py call synchronize(): it raises.
    CpuAccelerator.synchronize = nothing
    # shardformer/layer/utils.py:158-173 Randomizer (TP layers): manual_seed raises, and
    # get_rng_state passes `device` to torch.get_rng_state(), which takes no argument.
    CpuAccelerator.manual_seed = lambda self, seed: torch.manual_seed(seed)
    CpuAccelerator.manual_seed_all = lambda self, seed: torch.manual_seed(seed)
    CpuAccelerator.get_rng_state = lambda self, device=None: torch.get_rng_state()
    CpuAccelerator.set_rng_state = lambda self, new_state, device=None: torch.set_rng_state(new_state)
    CpuAccelerator.get_rng_state_all = lambda self: [torch.get_rng_state()]
    CpuAccelerator.set_rng_state_all = lambda self, new_states: torch.set_rng_state(new_states[0])
    # testing/utils.py:267-270 clear_cache_before_run, and any memory logging through the accelerator, raise;
    # report this process's host memory in bytes instead.
    CpuAccelerator.empty_cache = nothing
    CpuAccelerator.memory_allocated = lambda self, device=None: self.memory_reserved()
    CpuAccelerator.max_memory_allocated = lambda self, device=None: _peak_rss_bytes()
    CpuAccelerator.reset_peak_memory_stats = nothing
    CpuAccelerator.reset_max_memory_allocated = nothing
    # amp/naive_amp/grad_scaler/dynamic_grad_scaler.py:41 (fp16 loss scaler) calls device_count(); it raises.
    CpuAccelerator.device_count = lambda self: 1
    CpuAccelerator.reset_max_memory_cached = nothing
    CpuAccelerator.memory_stats = lambda self, device=None: {}
    CpuAccelerator.memory_summary = lambda self, device=None, abbreviated=False: ""


def _patch_zero_sanity_check() -> None:
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    # zero/low_level/low_level_optim.py:254 _sanity_checks asserts accelerator.name in ["cuda", "npu"] ("device is
    # required"); every ZeRO path, hence every EP run, dies at booster.boost. Keep its dtype check, drop the device one.
    def _sanity_checks(self):
        for group in self.optim.param_groups:
            for param in group["params"]:
                if not getattr(param, "skip_zero_check", False):
                    assert param.dtype == self._dtype, (
                        f"Parameters are expected to have the same dtype `{self._dtype}`, but got `{param.dtype}`"
                    )

    LowLevelZeroOptimizer._sanity_checks = _sanity_checks


def _patch_record_stream() -> None:
    # low_level_optim.py:343 _run_reduction calls flat_grads.record_stream(stream) when overlap_communication=True
    # (LowLevelZeroPlugin's default); on a CPU tensor torch raises "unknown parameter type".
    original = torch.Tensor.record_stream

    def record_stream(self, stream):
        if self.device.type == "cpu":
            return None
        return original(self, stream)

    torch.Tensor.record_stream = record_stream


def _patch_hccl_probe() -> None:
    # pipeline/p2p.py:159 _check_for_nccl_hccl_backend calls dist.is_hccl_available() (absent from torch's CPU build)
    # and, when NCCL is compiled in (torch 2.14 CUDA build without a GPU), reads Backend.HCCL (absent there).
    if not hasattr(dist, "is_hccl_available"):
        dist.is_hccl_available = lambda: False
    if not hasattr(dist.Backend, "HCCL"):
        dist.Backend.HCCL = "hccl"


def _patch_moe_checkpoint_io() -> None:
    from colossalai.checkpoint_io.moe_checkpoint import MoECheckpointIO

    # checkpoint_io/moe_checkpoint.py:284 gather_from_sharded_optimizer_state does `v = v.cuda()` (save_optimizer) and
    # :697 pre_save_model does `param.data.cuda()` (unsharded save_model); gloo gathers CPU tensors just as well.
    gather = MoECheckpointIO.gather_from_sharded_optimizer_state  # a staticmethod, read through the class
    MoECheckpointIO.gather_from_sharded_optimizer_state = staticmethod(_keep_on_cpu(gather))
    MoECheckpointIO.pre_save_model = _keep_on_cpu(MoECheckpointIO.pre_save_model)


def apply_cpu_patches() -> bool:
    """Patch colossalai 0.5.0 so that its MoE plugin, ZeRO and MoE checkpoint IO work on CPU over gloo.

    Idempotent. Call it in every rank before `colossalai.launch*`, the plugin and the booster are created.
    Returns True when the patches are in place, False when CUDA is available (nothing is patched then).
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        _patch_cpu_accelerator()
        _patch_zero_sanity_check()
        _patch_record_stream()
        _patch_hccl_probe()
        _patch_moe_checkpoint_io()
        _applied = True
    return True
