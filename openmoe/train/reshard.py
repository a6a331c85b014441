"""Resuming onto another parallel layout (world size, plugin, ep/pp sizes): the optimizer state, which ZeRO keeps as
flat shards per rank, is read back by logical coordinates.

Every parameter has one logical tensor: what the HF-format model holds (experts in logical order, [E, ...]). A rank's
fp32 master shard of a working parameter covers one contiguous flat range of that working tensor (ZeRO pads the
flattened parameter to a multiple of its group size and keeps chunk `local_rank`); an expert-parallel rank's working
expert tensor is itself the contiguous slice [ep_rank * E_l, (ep_rank + 1) * E_l) of the logical one, so its shard is
a contiguous flat range of the logical tensor too. Each rank's optimizer file records these ranges ("layout"); a rank
of the new layout fills each of its shards (master weights and Adam moments) from the overlapping pieces of every old
rank's file. Same values, other places: the first resumed step computes what the old layout would have, up to the
order of floating-point reductions.
"""

from __future__ import annotations

import torch

from openmoe.backend.colossal import grad_scaler, master_shard_ranges
from openmoe.parallel.gather import ep_layer_lookup

LAYOUT = "layout"  # key of the range list in each rank's optimizer state file


def logical_ranges(model, optimizer) -> list[dict]:
    """Per master shard (in the optimizer's order): parameter name and the [start, stop) flat range of the logical
    tensor it holds (padding excluded)."""
    module = model.unwrap()
    names = {id(p): n for n, p in module.named_parameters()}
    ep_layer = ep_layer_lookup(module)
    out = []
    for name, start, stop, numel in master_shard_ranges(optimizer, names):
        layer = ep_layer(name)
        offset = layer.ep_rank * numel if layer is not None else 0  # the EP rank's slice of [E, ...]
        out.append({"name": name, "start": offset + start, "stop": offset + stop})
    return out


def layout_key(run, world: int) -> tuple:
    """What decides the shards' places: equal keys mean the saved files can be loaded as they are."""
    par = run["parallel"] if isinstance(run, dict) else vars(run.parallel)
    return (world, par["plugin"], par["ep_size"], par["extra_dp_size"], par["pp_size"], par["zero_stage"])


def _pieces(files: list[dict]) -> dict[str, list[tuple]]:
    """name -> [(start, stop, master, exp_avg, exp_avg_sq)] over every old rank's file."""
    pieces: dict[str, list[tuple]] = {}
    for saved in files:
        optim = saved["optim"]  # torch's state_dict: state keyed by each master's index in param_groups order
        order = [i for group in optim["param_groups"] for i in group["params"]]
        for index, rng, master in zip(order, saved[LAYOUT], saved["masters"], strict=True):
            st = optim["state"].get(index, {})
            pieces.setdefault(rng["name"], []).append(
                (rng["start"], rng["stop"], master, st.get("exp_avg"), st.get("exp_avg_sq")))
    return pieces


@torch.no_grad()
def load_resharded_optimizer(model, optimizer, files: list[dict]) -> None:
    """Fill this rank's ZeRO shards (fp32 masters and Adam moments) from the optimizer files of every rank of the old
    layout (each holding its LAYOUT ranges)."""
    missing = [i for i, f in enumerate(files) if LAYOUT not in f]
    if missing:
        raise ValueError("the checkpoint's optimizer files have no shard layout (written before resharding was "
                         "supported): resume it with the parallel layout it was written with")
    pieces = _pieces(files)
    inner = optimizer.optim
    template = next((s for f in files for s in f["optim"]["state"].values() if "step" in s), None)
    masters = [m for group in inner.param_groups for m in group["params"]]
    for master, rng in zip(masters, logical_ranges(model, optimizer), strict=True):
        moments = {"exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}
        covered = 0
        for start, stop, old_master, exp_avg, exp_avg_sq in pieces.get(rng["name"], []):
            lo, hi = max(start, rng["start"]), min(stop, rng["stop"])
            if lo >= hi:
                continue
            dst, src = slice(lo - rng["start"], hi - rng["start"]), slice(lo - start, hi - start)
            master[dst] = old_master[src].to(master.device)
            for key, old in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                if old is not None:
                    moments[key][dst] = old[src].to(master.device)
            covered += hi - lo
        if covered != rng["stop"] - rng["start"]:
            raise ValueError(f"the checkpoint holds {covered} of the {rng['stop'] - rng['start']} optimizer values "
                             f"this rank needs for {rng['name']}: its files do not cover the parameter")
        if template is not None:
            inner.state[master] = {"step": template["step"].clone().to(master.device), **moments}
    for group, saved_group in zip(inner.param_groups, files[0]["optim"]["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    scaler = grad_scaler(optimizer)
    if scaler is not None and files[0]["grad_scaler"] is not None:
        scaler.load_state_dict(files[0]["grad_scaler"])
