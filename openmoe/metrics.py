"""Per-step training metrics: JSONL (always) and TensorBoard (when installed), plus a PNG report.

    python -m openmoe.metrics OUTPUT_PATH/metrics.jsonl [--out report.png]

renders loss parts over steps and a per-layer x per-expert token-load heatmap (routing collapse shows up as one
bright column per row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class MetricsWriter:
    """Writes one JSON object per logged step, and the scalars to TensorBoard and (with a project) Weights & Biases.
    Create it on the rank that logs (rank 0) only. W&B honours its own environment (WANDB_MODE=offline keeps the run
    on disk under directory/wandb, for `wandb sync` later)."""

    def __init__(self, directory: str, tensorboard: bool = True, wandb_project: str | None = None,
                 run_config: dict | None = None):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; JSONL is always written
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError(f"--wandb {wandb_project} needs the wandb package (pip install wandb)") from None
            self._wandb = wandb.init(project=wandb_project, dir=directory, config=run_config,
                                     name=os.path.basename(os.path.abspath(directory)))

    def log(self, step: int, record: dict) -> None:
        record = {"step": step, **record}
        self._file.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (or a run directory's). A last line cut short (the run was killed while writing
    it) is skipped with a warning; any other unreadable line is a ValueError naming file and line."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file {path} does not exist")
    with open(path) as f:
        lines = f.readlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines) and not line.endswith("\n"):
                print(f"warning: {path} line {number} is cut short (a run killed while writing it); skipped",
                      file=sys.stderr)
                continue
            raise ValueError(f"{path} line {number} is not a JSON record: {line.strip()[:80]!r}") from None
    return records


def render(records: list[dict], out_png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not records:
        raise ValueError("no metrics records to plot")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for key in ("loss", "ce_loss", "z_loss", "aux_loss", "router_z_loss", "eval_loss"):
        points = [(r["step"], r[key]) for r in records if key in r]  # eval and rebalance records stand apart
        if points:
            ax1.plot(*zip(*points), "o-" if key == "eval_loss" else "-", label=key)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("loss parts")
    ax1.legend()
    loads = [r["tokens_per_expert"] for r in records if "tokens_per_expert" in r]
    if loads:
        total = np.array(loads, dtype=float).sum(axis=0)  # [layers, E] summed over logged steps
        share = total / total.sum(axis=1, keepdims=True).clip(min=1)
        # fixed scale 0 .. >= 2/E: a uniform router reads mid-scale, a collapsed one saturates
        im = ax2.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0 / share.shape[1], share.max()))
        ax2.set_xticks(range(share.shape[1]))
        ax2.set_yticks(range(share.shape[0]))
        ax2.set_xlabel("expert")
        ax2.set_ylabel("MoE layer (in model order)")
        ax2.set_title("token share per expert (uniform = 1/E)")
        fig.colorbar(im, ax=ax2)
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def main(argv=None):
    parser = argparse.ArgumentParser(description="Render a run's metrics.jsonl as a PNG")
    parser.add_argument("metrics", help="metrics.jsonl or the run's output directory")
    parser.add_argument("--out", default=None, help="PNG path (default: next to metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        records = read_metrics(args.metrics)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = args.metrics if os.path.isdir(args.metrics) else os.path.dirname(args.metrics)
    print(render(records, args.out or os.path.join(base, "metrics.png")))


if __name__ == "__main__":
    sys.exit(main())
