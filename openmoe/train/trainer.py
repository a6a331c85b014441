"""The training loop: `Trainer(build(run)).train()`. The loop holds only the control flow (step, skip non-finite
and fp16-overflow steps, stop after too many); everything else is a step hook, called on every rank in order:

  FaultInjection  tests only, from OPENMOE_FAULT_* environment variables (NaN loss/gradient, raise, slow steps)
  Rebalancer      --load_balance: move experts every --load_balance_interval steps (collective)
  Evaluator       --eval_dataset/--eval_split: eval loss every --eval_interval steps and at the end (collective)
  AdapterSaver    --lora_rank: a PEFT adapter directory beside every checkpoint (collective)
  MetricsLogger   rank 0: progress bar, JSONL/TensorBoard records, rebalance reports
  Checkpointer    resumable checkpoints every --save_interval steps and at the end (collective)
  Preemption      SIGTERM/SIGINT: every rank finishes the step, saves, and stops (collective: one flag per step)

Skipped steps: a step is skipped on every rank (no update, the LR schedule does not advance) when its loss or, in
bf16, a gradient is not finite (our vote, before the optimizer step), or when fp16's loss scaler found an overflow
(ColossalAI's optimizer skips those silently: we read its flag after the step). A non-finite loss or bf16 gradient
counts toward --max_bad_steps at once; an fp16 overflow only once the loss scale is at its minimum, because before
that each overflow halves the scale, which is how dynamic loss scaling finds its level (several in a row at the start
of a run are normal).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from openmoe.backend.colossal import LossScale, loss_scale_after_step
from openmoe.model import OpenMoeOutput
from openmoe.parallel.gather import moe_layers
from openmoe.parallel.load_balance import LayerRebalance, rebalance
from openmoe.train.builder import TrainState
from openmoe.train.checkpointing import checkpoint_root, save_checkpoint
from openmoe.train.step import StepStats, count_expert_load, reduce_stats, train_step


class TrainingStopped(RuntimeError):
    """A run ended on purpose (e.g. too many non-finite steps): reported as one line, no traceback."""


class Preempted(RuntimeError):
    """SIGTERM/SIGINT: the run saved a checkpoint and stops with exit code 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StepResult:
    step: int
    outs: list
    applied: bool
    stats: StepStats | None = None  # on logged steps
    moves: list[LayerRebalance] | None = None  # on rebalancing steps
    loss_scale: LossScale | None = None  # fp16
    extra: dict = field(default_factory=dict)  # further records for this step's metrics (e.g. the eval loss)


class StepHook:
    def before_step(self, trainer: Trainer, step: int) -> None: ...

    def after_step(self, trainer: Trainer, result: StepResult) -> None: ...

    def on_end(self, trainer: Trainer) -> None: ...


class Trainer:
    def __init__(self, state: TrainState, hooks: list[StepHook] | None = None):
        self.state = state
        self.hooks = default_hooks(state) if hooks is None else hooks
        self.skipped = 0  # steps skipped so far in this run (non-finite or fp16 overflow)
        self.last_saved: tuple[int, str] | None = None  # (step, path) of the newest checkpoint this run wrote

    def train(self) -> None:
        state = self.state
        it, bad = iter(state.batches), 0
        state.model.train()
        for step in range(state.start_step + 1, state.total_steps + 1):
            for hook in self.hooks:
                hook.before_step(self, step)
            result = self.step(step, it)
            if result.applied:
                bad = 0
            else:
                self.skipped += 1
                scale = result.loss_scale
                counted = scale is None or not scale.skipped or scale.at_minimum
                bad = bad + 1 if counted else 0
                if state.rank == 0:
                    print(f"\nwarning: step {step}: {self.skip_reason(result, bad)}", flush=True)
                if bad >= state.run.optim.max_bad_steps:
                    overflow = " or fp16 gradient overflow" if scale is not None and scale.skipped else ""
                    raise TrainingStopped(
                        f"stopping: {bad} consecutive steps with a non-finite loss{overflow} (--max_bad_steps "
                        f"{state.run.optim.max_bad_steps}); the last checkpoint under "
                        f"{checkpoint_root(state.run.checkpoint.output_path)} is untouched")
            for hook in self.hooks:
                hook.after_step(self, result)
        for hook in self.hooks:
            hook.on_end(self)

    def skip_reason(self, result: StepResult, bad: int) -> str:
        scale = result.loss_scale
        if scale is None or not scale.skipped:
            return f"non-finite loss or gradient; step skipped ({bad} in a row)"
        if scale.at_minimum:
            return (f"fp16 gradient overflow at the minimum loss scale {scale.scale:g}; step skipped ({bad} in a "
                    "row)")
        return (f"fp16 gradient overflow, loss scale now {scale.scale:g}; step skipped ({self.skipped} skipped in "
                "this run; overflows count toward --max_bad_steps once the scale is at its minimum)")

    def step(self, step: int, it) -> StepResult:
        """One optimizer step; on applied steps the LR schedule advances, router choices are counted for balancing,
        and on logged steps the statistics are reduced over the ranks (with this step's expert placement)."""
        state = self.state
        outs, applied = train_step(state.model, state.booster, state.optimizer, it, state.run.optim.grad_accum,
                                   state.device, check_grads=state.run.parallel.precision == "bf16")
        scale = loss_scale_after_step(state.optimizer) if applied else None  # fp16: did the scaler skip it?
        applied = applied and not (scale is not None and scale.skipped)
        result = StepResult(step, outs, applied, loss_scale=scale)
        if applied:
            state.scheduler.step()
            count_expert_load(outs, state.device, state.balancer, state.placement)
            if step % state.run.logging.log_interval == 0 or step == state.total_steps:
                result.stats = reduce_stats(outs, state.cfg, state.device, state.placement)
        return result


def default_hooks(state: TrainState) -> list[StepHook]:
    hooks: list[StepHook] = []
    faults = FaultInjection.from_env(state.rank)
    if faults is not None:
        hooks.append(faults.install(state.model.unwrap()))
    if state.placement is not None:
        hooks.append(Rebalancer())
    if state.eval_examples is not None:
        from openmoe.train.evaluate import Evaluator

        hooks.append(Evaluator())
    if state.run.lora.lora_rank:
        from openmoe.train.lora import AdapterSaver

        hooks.append(AdapterSaver())
    hooks += [MetricsLogger(state), Checkpointer(), Preemption(state)]
    return hooks


class Rebalancer(StepHook):
    """--load_balance, every --load_balance_interval steps (after the optimizer step, not on the last step): move
    experts between EP ranks by the load counted since the last rebalance. Collective over the world."""

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        from openmoe.backend.colossal import shard_copies

        state = trainer.state
        step = result.step
        if result.applied and step % state.run.balance.load_balance_interval == 0 and step != state.total_steps:
            result.moves = rebalance(moe_layers(state.model), state.placement, shard_copies(state.optimizer))


class Checkpointer(StepHook):
    """A resumable checkpoint every --save_interval steps and at the end of the run."""

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        state, interval = trainer.state, trainer.state.run.checkpoint.save_interval
        if result.applied and interval and result.step % interval == 0 and result.step != state.total_steps:
            trainer.last_saved = result.step, save_checkpoint(state, result.step)

    def on_end(self, trainer: Trainer) -> None:
        trainer.last_saved = trainer.state.total_steps, save_checkpoint(trainer.state, trainer.state.total_steps)


class Preemption(StepHook):
    """SIGTERM/SIGINT (a scheduler's preemption, Ctrl-C, train.sh forwarding either) on any rank: every rank stops
    after the same step (the step after the signal's, see below), a checkpoint of it is written, and the run raises
    Preempted (exit code 128 + signal). From the signal on, a watchdog thread exits the process (without a
    checkpoint) once --preempt_grace_s has passed, so a rank never outlives the scheduler's grace period waiting on a
    peer that died.

    The handler only sets a flag. After each step every rank starts a scalar all-reduce (MAX) of it without waiting,
    and reads the previous step's result: that one finished during this step (the step's finiteness vote already
    synchronised the host), so the check adds no host sync to a step; the price is stopping one step later."""

    def __init__(self, state: TrainState):
        self.grace_s, self.rank, self.device = state.run.checkpoint.preempt_grace_s, state.rank, state.device
        self.signum = 0
        self.vote: tuple | None = None  # the all-reduce in flight: (work or None, value tensor, CUDA event or None)
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame) -> None:
        if self.signum:
            return  # the launcher and the scheduler may both deliver it
        self.signum = signum
        timer = threading.Timer(self.grace_s, self._expire)
        timer.daemon = True
        timer.start()

    def _expire(self) -> None:
        print(f"[rank {self.rank}] preempted ({signal.Signals(self.signum).name}): no checkpoint within "
              f"--preempt_grace_s {self.grace_s:g}; exiting without one", file=sys.stderr, flush=True)
        os._exit(128 + self.signum)

    def _start_vote(self) -> None:
        flag = torch.tensor([float(self.signum)], device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if flag.is_cuda:  # NCCL: queue the copy to pinned memory behind it; no host wait here
            work.wait()  # the current stream waits for the collective (the host does not)
            host = torch.empty(1, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.vote = (None, host, event)
        else:
            self.vote = (work, flag, None)

    def _read_vote(self) -> int:
        """The signal number some rank had when the previous vote started, or 0."""
        if self.vote is None:
            return 0
        work, value, event = self.vote
        self.vote = None
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()  # recorded a step ago, before this step's synchronising finiteness vote: done
        return int(value.item())

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        signum = self._read_vote()
        if not signum:
            self._start_vote()
            return
        step = result.step
        if trainer.last_saved is None or trainer.last_saved[0] != step:
            trainer.last_saved = step, save_checkpoint(trainer.state, step)
        raise Preempted(f"preempted ({signal.Signals(signum).name}): saved {trainer.last_saved[1]} at step {step}; "
                        "continue with --resume", 128 + signum)

    def on_end(self, trainer: Trainer) -> None:
        self._read_vote()  # no collective left in flight
        for sig, handler in self.previous.items():  # after the final save: the export runs under the usual ones
            signal.signal(sig, handler)


def tolerate_closed_output() -> None:
    """Keep a rank running when whoever reads its stdout/stderr goes away (the launcher killed by the same SIGTERM
    that asks the rank to save): writes then fail with BrokenPipeError, which would stop the rank mid-save."""
    sys.stdout, sys.stderr = _Tolerant(sys.stdout), _Tolerant(sys.stderr)


class _Tolerant:
    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


class MetricsLogger(StepHook):
    """Rank 0: a progress bar (loss, aux, z, lr, tokens/s) and one JSONL/TensorBoard record per logged step."""

    def __init__(self, state: TrainState):
        from tqdm import tqdm

        from openmoe.metrics import MetricsWriter

        self.rank0 = state.rank == 0
        log = state.run.logging
        if self.rank0:
            keep_metrics_until(os.path.join(state.run.checkpoint.output_path, "metrics.jsonl"), state.start_step)
        self.writer = MetricsWriter(state.run.checkpoint.output_path, log.tensorboard, log.wandb,
                                    state.run.to_dict()) if self.rank0 else None
        self.bar = tqdm(total=state.total_steps, initial=state.start_step, disable=not self.rank0, desc="train",
                        dynamic_ncols=True)
        self.clock = Throughput()
        if self.rank0:
            s, run = state.sizes, state.run
            pipeline = f" in {s.num_microbatches} micro-batches" if s.pp > 1 else ""
            print(f"plugin {run.parallel.plugin}: world {s.world}, ep {s.ep}, pp {s.pp}, moe_dp {s.moe_dp}, "
                  f"dp {s.dp}; {state.total_steps} steps of {run.optim.batch_size}x{run.optim.grad_accum}x{s.dp} "
                  f"examples{pipeline}; optimizer step: {optimizer_step_name(run)}", flush=True)

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        if self.rank0:
            state = trainer.state
            if result.stats is not None:
                rate = self.clock.update(result.stats.tokens * state.run.logging.log_interval)
                self.log_step(result, state.scheduler.get_last_lr()[0], state.optimizer.get_grad_norm(), rate,
                              trainer.skipped)
            elif result.moves is not None or result.extra:
                self.writer.log(result.step, {**(rebalance_record(result.moves) if result.moves else {}),
                                              **result.extra})
            if result.moves is not None:
                print(f"\nstep {result.step}: expert rebalance: " + "; ".join(
                    m.describe(state.placement.layer_names[m.layer]) for m in result.moves), flush=True)
        self.bar.update(1)

    def log_step(self, result: StepResult, lr: float, grad_norm, tok_per_s: float, skipped: int = 0) -> None:
        stats = result.stats
        record = {"loss": stats.loss, "ce_loss": stats.ce_loss, "z_loss": stats.z_loss, "aux_loss": stats.aux_loss,
                  "router_z_loss": stats.router_z_loss, "lr": lr, "tokens": stats.tokens, "tokens_per_s": tok_per_s,
                  "dropped_fraction": stats.dropped_fraction, "tokens_per_expert": stats.tokens_per_expert,
                  "skipped_steps": skipped}
        if result.loss_scale is not None:
            record["loss_scale"] = result.loss_scale.scale
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if result.moves is not None:
            record.update(rebalance_record(result.moves))
        record.update(result.extra)
        if torch.cuda.is_available():
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30  # rank 0
        self.writer.log(result.step, record)
        shown = {"eval": f"{result.extra['eval_loss']:.3f}"} if "eval_loss" in result.extra else {}
        self.bar.set_postfix(loss=f"{stats.loss:.3f}", aux=f"{stats.aux_loss:.4f}", z=f"{stats.z_loss:.3f}",
                             lr=f"{lr:.2e}", tok_s=f"{tok_per_s:.0f}", **shown, refresh=False)

    def on_end(self, trainer: Trainer) -> None:
        self.bar.close()
        if self.rank0:
            self.writer.close()


def optimizer_step_name(run) -> str:
    """Which optimizer step the run uses (the resolved --lean_zero / --adamw_kernel), for the setup log line."""
    zero = run.parallel.zero_stage
    threads = torch.get_num_threads()
    offload = (f", optimizer state in host memory (AdamW on {threads} CPU thread{'s' * (threads != 1)})"
               if run.parallel.offload_optimizer else "")
    if run.parallel.lean_zero:
        return "lean ZeRO-1" + (" with the AdamW kernel" if run.kernels.adamw_kernel else "") + offload
    return f"colossalai's ZeRO-{zero}{offload}" if zero else "colossalai's (no ZeRO)"


def keep_metrics_until(path: str, step: int) -> None:
    """Drop the records after `step` (where this run starts: 0, or the resumed checkpoint's step) from a metrics file
    an earlier attempt left, and a line torn by a kill: the file then holds each step once, as the run trained it."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def rebalance_record(moves: list[LayerRebalance]) -> dict:
    """--load_balance: per MoE layer the EP-rank loads (tokens routed since the previous rebalance) under the old and
    the new placement and the experts swapped; plus scalars (worst layer's max/mean rank load) for TensorBoard."""
    return {"rebalance": [{"layer": m.layer, "rank_loads_before": m.rank_loads_before,
                           "rank_loads_after": m.rank_loads_after, "swaps": m.swaps} for m in moves],
            "rank_load_max_over_mean_before": max(m.max_over_mean(m.rank_loads_before) for m in moves),
            "rank_load_max_over_mean_after": max(m.max_over_mean(m.rank_loads_after) for m in moves),
            "expert_swaps": sum(len(m.swaps) for m in moves)}


class Throughput:
    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def update(self, tokens: int) -> float:
        t = time.perf_counter()
        rate = tokens / max(t - self.t0, 1e-9)
        self.t0 = t
        return rate


class _NanGradient(torch.autograd.Function):
    """Identity in forward, NaN gradient in backward: a non-finite gradient behind a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class FaultInjection(StepHook):
    """Fault injection for tests, from the environment: OPENMOE_FAULT_NAN_STEPS="3,4" makes those steps' loss NaN,
    OPENMOE_FAULT_NAN_GRAD_STEPS their gradients (the loss stays finite), OPENMOE_FAULT_RAISE_AT="RANK:STEP" raises
    there, OPENMOE_FAULT_HANG_AT="RANK:STEP" blocks there forever (a rank that hangs alive), OPENMOE_FAULT_SLOW_STEP_S
    sleeps each step (so a test can kill the job mid-run). The loss is changed by a
    forward hook on the model: the production step knows nothing of it."""

    def __init__(self, rank: int, nan_steps: set[int], nan_grad_steps: set[int], raise_at: tuple[int, int] | None,
                 slow_s: float, hang_at: tuple[int, int] | None = None):
        self.rank, self.nan_steps, self.nan_grad_steps = rank, nan_steps, nan_grad_steps
        self.raise_at, self.slow_s, self.step, self.hang_at = raise_at, slow_s, 0, hang_at

    @classmethod
    def from_env(cls, rank: int) -> FaultInjection | None:
        env = os.environ
        if not any(k.startswith("OPENMOE_FAULT_") for k in env):
            return None

        def steps(name):
            return {int(s) for s in env.get(name, "").split(",") if s.strip()}

        def rank_step(name):
            return tuple(map(int, env[name].split(":"))) if env.get(name) else None

        return cls(rank, steps("OPENMOE_FAULT_NAN_STEPS"), steps("OPENMOE_FAULT_NAN_GRAD_STEPS"),
                   rank_step("OPENMOE_FAULT_RAISE_AT"), float(env.get("OPENMOE_FAULT_SLOW_STEP_S") or 0),
                   rank_step("OPENMOE_FAULT_HANG_AT"))

    def install(self, module: torch.nn.Module) -> FaultInjection:
        module.register_forward_hook(self._poison)
        return self

    def _poison(self, module, args, out):
        if not isinstance(out, OpenMoeOutput) or out.loss is None:
            return out  # a pipeline stage before the last
        if self.step in self.nan_steps:
            out.loss = out.loss * float("nan")
        elif self.step in self.nan_grad_steps:
            out.loss = _NanGradient.apply(out.loss)
        return out

    def before_step(self, trainer: Trainer, step: int) -> None:
        self.step = step
        if self.raise_at == (self.rank, step):
            raise RuntimeError(f"injected failure on rank {self.rank} at step {step}")
        while self.hang_at == (self.rank, step):
            time.sleep(3600)
        if self.slow_s:
            time.sleep(self.slow_s)
