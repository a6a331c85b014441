"""One markdown table (and a PNG of tokens/s per GPU) from the JSON records of benchmark/run_train_bench.py.

    python3 benchmark/summarize_bench.py DIR [DIR ...] [--md FILE] [--png FILE]     # e.g. both halves' outputs

Ratios compare rows of the same model shape on the same number of GPUs with the same micro-batches per optimizer
step (--grad_accum): "x a" against baseline (a) (HF Mixtral with ColossalAI's policy), "x b" against baseline (b)
(naive einsum MoE under DDP). tokens/s ratios compare equal token counts (OpenMoE does more FLOPs per token than
Mixtral at the same shape); TFLOP/s ratios compare work rates.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

FORMULA = ("model FLOPs/token = 6 x activated params (dense matmul weights incl. LM head and routers + top_k/E of "
           "expert weights; embedding and norm scales excluded) + 6 x layers x seq x heads x head_dim (causal "
           "attention scores, fwd+bwd); MFU = model FLOP/s per GPU / 989 TFLOP/s (H100/H200 dense bf16)")


def load(dirs: list[str]) -> list[dict]:
    records = {}
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "*.json"))):
            try:
                with open(path) as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and "name" in rec:
                records[rec["name"]] = rec  # a later directory wins for the same name
    return list(records.values())


def _num(x, fmt="{:.1f}", scale=1.0, none="n/a"):
    return none if x is None else fmt.format(x * scale)


def layout(r: dict) -> str:
    lay = r.get("layout") or {}
    if r.get("kind") == "naive":
        return f"DDP {lay.get('dp', r.get('gpus'))}"
    if r.get("kind") == "mixtral":
        return f"ep {lay.get('ep')}, ZeRO-1"
    if not lay:
        return ""
    parts = [f"pp {lay['pp']}"] if lay.get("pp", 1) > 1 else []
    parts.append(f"ep {lay.get('ep')}")
    if lay.get("moe_dp", 1) > 1 and lay.get("pp", 1) == 1:
        parts.append(f"moe_dp {lay['moe_dp']}")
    return f"{lay.get('plugin')}: " + " x ".join(parts)


def routing_note(r: dict) -> str:
    rt = r.get("routing") or {}
    cf = rt.get("capacity_factor")
    mode = "dropless" if cf == 0 else (f"cap {cf}" if cf is not None else "")
    bits = [mode] if mode else []
    if rt.get("dropped_fraction"):
        bits.append(f"{100 * rt['dropped_fraction']:.1f}% dropped")
    if rt.get("max_over_mean_load") is not None:
        bits.append(f"max/mean load {rt['max_over_mean_load']:.2f}")
    if rt.get("skipped_steps"):
        bits.append(f"{rt['skipped_steps']} non-finite steps skipped")
    return ", ".join(bits)


def match_key(r: dict) -> tuple:
    """Rows compared with each other: same model shape, GPU count and micro-batches per optimizer step."""
    return r.get("shape"), r.get("gpus"), (r.get("options") or {}).get("grad_accum", 1)


def ratios(r: dict, by_key: dict) -> tuple[str, str, str]:
    key = match_key(r)
    a, b = by_key.get(("mixtral",) + key), by_key.get(("naive",) + key)

    def ratio(base, field):
        if base is None or r.get(field) is None or not base.get(field):
            return ""
        return f"{r[field] / base[field]:.2f}"

    return (ratio(a, "tokens_per_s_per_gpu"), ratio(a, "model_tflops_per_gpu"), ratio(b, "tokens_per_s_per_gpu"))


def train_table(records: list[dict]) -> list[str]:
    ok = [r for r in records if not r.get("error") and r.get("kind") in ("mixtral", "naive")]
    by_key = {(r["kind"],) + match_key(r): r for r in ok}
    head = ("| config | GPUs | layout | tokens/s/GPU | TFLOP/s/GPU | MFU % | % of GEMM peak | peak GiB | all-to-all % "
            "| tok/s x a | TFLOP/s x a | tok/s x b | notes |")
    lines = [head, "|" + "---|" * 13]
    for r in records:
        if r.get("kind") == "micro":
            continue
        if r.get("error"):
            dashes = " — |" * 6 + "  |" * 3
            lines.append(f"| {r['name']} | {r.get('gpus', '')} | {layout(r)} |{dashes} **error**: {r['error']} |")
            continue
        a2a = r.get("a2a_frac")
        a2a_cell = _num(a2a, scale=100) if r.get("has_all_to_all") or a2a is None else "0 (none)"
        xa_tok, xa_fl, xb_tok = ratios(r, by_key)
        note = "; ".join(x for x in (r.get("label", ""), routing_note(r), r.get("note", "")) if x)
        lines.append(
            f"| {r['name']} | {r['gpus']} | {layout(r)} | {r['tokens_per_s_per_gpu']:,.0f} | "
            f"{r['model_tflops_per_gpu']:.1f} | {100 * r['mfu']:.1f} | {_num(r.get('vs_gemm_peak'), scale=100)} | "
            f"{_num(r.get('peak_mem_gib'))} | {a2a_cell} | {xa_tok} | {xa_fl} | {xb_tok} | {note} |")
    return lines


def micro_table(records: list[dict]) -> list[str]:
    lines = []
    for rec in records:
        if rec.get("kind") != "micro":
            continue
        if rec.get("error"):
            lines += [f"MoE layer micro-benchmark {rec['name']}: **error**: {rec['error']}", ""]
            continue
        gemm = rec.get("gemm_peak_tflops")
        lines += [f"MoE layer fwd+bwd, {rec['model']} shape: T={rec['tokens']}, H={rec['hidden']}, "
                  f"I={rec['expert_width']}, E={rec['experts']}, top-{rec['top_k']}, bf16, {rec['device']}; "
                  f"GEMM peak ({rec['gemm_n']}^3 bf16) {_num(gemm, '{:.0f}')} TFLOP/s; routing {rec['routing']}", "",
                  "| impl | ms | model TFLOP/s | % of dense-equivalent | % of GEMM peak | hw TFLOP/s (incl. padding) "
                  "| peak GiB | dropped % | max/mean load |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in rec["rows"]:
            if row.get("error"):
                lines.append(f"| {row['impl']} | **error**: {row['error']} | | | | | | | |")
                continue
            lines.append(f"| {row['impl']} | {row['ms']:.2f} | {row['model_tflops']:.1f} | "
                         f"{_num(row.get('vs_dense'), '{:.0f}', 100, '')} | "
                         f"{_num(row['model_tflops'] / gemm if gemm else None, '{:.0f}', 100)} | "
                         f"{_num(row.get('hw_tflops'), none='')} | {_num(row.get('peak_mem_gib'))} | "
                         f"{_num(row.get('dropped_fraction'), scale=100, none='')} | "
                         f"{_num(row.get('max_over_mean_load'), '{:.2f}', none='')} |")
        lines.append("")
    return lines


def header(records: list[dict]) -> list[str]:
    peaks = [r["gemm_peak_tflops"] for r in records if r.get("gemm_peak_tflops")]
    devices = sorted({r["device"] for r in records if r.get("device")})
    soft = sorted({f"torch {r['torch']}, colossalai {r.get('colossalai')}, transformers {r.get('transformers')}"
                   for r in records if r.get("torch") and r.get("kind") != "micro"})
    methods = sorted({r["comm_method"] for r in records if r.get("comm_method")})
    return [f"Devices: {', '.join(devices) or 'n/a'}. Software: {'; '.join(soft) or 'n/a'}.",
            f"Measured GEMM peak (8192^3 bf16, median over configurations): "
            f"{_num(statistics.median(peaks) if peaks else None, '{:.0f}')} TFLOP/s.",
            f"FLOPs: {FORMULA}.",
            "Data: synthetic random token ids, full attention mask, bf16. Routing: real (the router scores the actual "
            "hidden states of randomly initialised models; capacity drops where configured), never forced balanced.",
            f"All-to-all %: {'; '.join(methods) or 'n/a'}; share of the profiled steps' wall time, mean over ranks.",
            ""]


def plot(records: list[dict], path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    rows = [r for r in records if r.get("kind") != "micro" and not r.get("error")]
    if not rows:
        return "no successful configuration: no plot"
    colors = {"ours": "tab:blue", "mixtral": "tab:orange", "naive": "tab:gray"}
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.2))
    names = [r["name"] for r in rows][::-1]
    values = [r["tokens_per_s_per_gpu"] for r in rows][::-1]
    ax.barh(names, values, color=[colors.get(r["kind"], "tab:green") for r in rows][::-1])
    ax.set_xlabel("tokens/s per GPU (blue: ours, orange: baseline a, gray: baseline b)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def summarize(dirs: list[str], names: list[str] | None = None, md: str | None = None, png: str | None = None) -> str:
    records = load(dirs)
    if names is not None:
        order = {n: i for i, n in enumerate(names)}
        records = sorted((r for r in records if r["name"] in order), key=lambda r: order[r["name"]])
    else:
        records.sort(key=lambda r: r["name"])
    text = "\n".join(header(records) + train_table(records) + [""] + micro_table(records))
    md = md or os.path.join(dirs[0], "summary.md")
    with open(md, "w") as f:
        f.write(text + "\n")
    print(text)
    print(plot(records, png or os.path.join(dirs[0], "tokens_per_gpu.png")))
    print(f"table: {md}")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--md")
    p.add_argument("--png")
    a = p.parse_args(argv)
    summarize(a.dirs, md=a.md, png=a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
