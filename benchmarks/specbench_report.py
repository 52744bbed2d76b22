"""results.md and the PNG plots of a spec_bench run, from its records alone.

Why from records only: the report can be regenerated from a results.json (e.g.
after editing the layout) without re-running any engine:

    .venv/bin/python benchmarks/specbench_report.py DIR
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from specbench_common import METHODS as METHOD_ORDER, base_name

#: One colour per method in every plot, so the two figures read together
#: (a method at its own K, ``name@K``, gets matplotlib's next free colour).
COLORS = {"ar": "tab:gray", "vsd": "tab:orange", "vllm_parallel": "tab:green", "pard": "tab:red",
          "pard_fullhead": "tab:pink", "pard_adaptive": "tab:blue", "pard_adaptive_noguard": "tab:olive",
          "pard_confidence": "tab:cyan",
          "ngram": "tab:purple", "suffix": "tab:brown"}


def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def method_rank(method: str) -> tuple[int, str]:
    """Table/legend order: the methods' fixed order, ``name@K`` variants after their name."""
    name = base_name(method)
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else 99, method)


def _order(r):
    m = method_rank(r["method"])
    return (r["dataset"], r["temperature"], r.get("batch_size", r.get("concurrency", 0)), m)


def per_position(records) -> dict[str, list[float]]:
    """Acceptance rate at each draft position per method, pooled over its cells
    (weighted by the number of drafts, so big cells count for what they measured)."""
    sums, drafts = {}, defaultdict(float)
    for r in records:
        pos = r.get("acceptance_per_position")
        if not pos or not r.get("num_drafts"):
            continue
        acc = sums.setdefault(r["method"], [0.0] * len(pos))
        for i, p in enumerate(pos[:len(acc)]):
            acc[i] += p * r["num_drafts"]
        drafts[r["method"]] += r["num_drafts"]
    return {m: [a / drafts[m] for a in acc] for m, acc in sums.items()}


def offline_table(records) -> list[str]:
    lines = ["| dataset | T | batch | method | tok/s | speedup vs ar | tau | draft accept | identical to ar |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=_order):
        if r.get("status") != "ok":
            continue
        lines.append(f"| {r['dataset']} | {r['temperature']:g} | {r['batch_size']} | {r['method']} | "
                     f"{_f(r['tokens_per_s'], '{:.1f}')} | {_f(r['speedup_vs_ar'], '{:.2f}x')} | "
                     f"{_f(r.get('tau'))} | {_f(r.get('draft_acceptance_rate'), '{:.1%}')} | "
                     f"{_f(r.get('identical_to_ar'), '{:.0%}')} |")
    return lines


def online_table(records) -> list[str]:
    lines = ["| dataset | T | concurrency | method | requests | tok/s | speedup vs ar | tau | "
             "TTFT p50/p90/p99 (ms) | TPOT p50/p90/p99 (ms) | identical to ar (text) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def trio(r, key):
        return "/".join(_f(r.get(f"{key}_p{q}_ms"), "{:.0f}") for q in (50, 90, 99))

    for r in sorted(records, key=_order):
        if r.get("status") != "ok":
            continue
        lines.append(f"| {r['dataset']} | {r['temperature']:g} | {r['concurrency']} | {r['method']} | "
                     f"{r['num_requests']} | {_f(r['tokens_per_s'], '{:.1f}')} | "
                     f"{_f(r['speedup_vs_ar'], '{:.2f}x')} | {_f(r.get('tau'))} | "
                     f"{trio(r, 'ttft')} | {trio(r, 'tpot')} | {_f(r.get('identical_to_ar'), '{:.0%}')} |")
    return lines


def plot_speedup(records, path: Path, xkey: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok" and r.get("speedup_vs_ar") is not None]
    datasets = sorted({r["dataset"] for r in ok}) or ["-"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.6 * len(datasets) + 0.6, 3.0),
                             squeeze=False, dpi=80)
    for ax, ds in zip(axes[0], datasets):
        series = defaultdict(list)
        for r in ok:
            if r["dataset"] == ds:
                series[(r["method"], r["temperature"])].append((r[xkey], r["speedup_vs_ar"]))
        for (m, t), pts in sorted(series.items(), key=lambda kv: (method_rank(kv[0][0]),
                                                                  kv[0][1])):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLORS.get(m),
                    linestyle="-" if t == 0 else "--", label=f"{m} T={t:g}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        xs = sorted({r[xkey] for r in ok if r["dataset"] == ds})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_title(ds, fontsize=9)
        ax.set_xlabel("batch size" if xkey == "batch_size" else "concurrency", fontsize=8)
        ax.set_ylabel("speedup vs ar", fontsize=8)
        ax.tick_params(labelsize=7)
    if ok:
        axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_per_position(pos: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.4, 3.0), dpi=80)
    for m in sorted(pos, key=method_rank):
        ax.plot(range(1, len(pos[m]) + 1), pos[m], marker="o", color=COLORS.get(m), label=m,
                alpha=0.8)
    ax.set_xlabel("draft position", fontsize=8)
    ax.set_ylabel("acceptance rate", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.tick_params(labelsize=7)
    if pos:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, run: dict, records: list[dict]) -> None:
    online = run.get("mode") == "online"
    xkey = "concurrency" if online else "batch_size"
    pos = per_position(records)
    plot_speedup(records, out / "speedup_vs_batch.png", xkey)
    plot_per_position(pos, out / "acceptance_per_position.png")
    md = [f"# spec_bench results ({run['mode']})", "",
          f"- command: `{run['command']}`",
          f"- vLLM {run['vllm_version']}, torch {run['torch_version']}, {run['cpu_model']} "
          f"({run['cpu_count']} CPUs), {run['date']}",
          f"- target `{run['target']}`, draft `{run['draft']}` (methods written `NAME@K:DIR` use DIR), "
          f"K={run['k']}, dtype {run['dtype']}, "
          f"{'compiled' if run['compile'] else 'eager'}, max_tokens {run['max_tokens']}",
          f"- batching: {run['batching']}",
          f"- wall time {run['wall_s']:.0f} s; load average at start {run['loadavg_start'][0]:.1f}, "
          f"at end {run['loadavg_end'][0]:.1f}", ""]
    md += ["## Throughput and acceptance", ""]
    md += online_table(records) if online else offline_table(records)
    md += ["", "tau = 1 + accepted / drafts (bonus token included); draft accept = accepted / "
           "drafted tokens (\"-\": the method proposed no drafts in that cell); identical = share of outputs (token ids) equal to ar's, temperature 0 only.",
           "", "## Acceptance rate per draft position (pooled over cells)", ""]
    if pos:
        k = max(len(v) for v in pos.values())
        md += ["| method | " + " | ".join(str(i + 1) for i in range(k)) + " |",
               "|---|" + "---|" * k]
        md += [f"| {m} | " + " | ".join(f"{p:.3f}" for p in v) + " |"
               for m, v in sorted(pos.items(), key=lambda kv: method_rank(kv[0]))]
    else:
        md.append("(no speculative method ran)")
    skipped = {r["method"]: r["reason"] for r in records if r.get("status") != "ok"}
    if skipped:
        md += ["", "## Not run", ""] + [f"- `{m}`: {why}" for m, why in skipped.items()]
    md += ["", "![speedup](speedup_vs_batch.png)", "",
           "![acceptance per position](acceptance_per_position.png)", ""]
    (out / "results.md").write_text("\n".join(md))


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    data = json.loads((folder / "results.json").read_text())
    write_report(folder, data["run"], data["records"])
    print(f"wrote {folder}/results.md and plots")
