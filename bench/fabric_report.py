"""Output of bench/fabric.py: the table, the sweep plot (PNG) and one W&B offline run.

Kept apart from the driver so that the driver reads as the experiment and this as its
presentation: everything here works on the `Point`s the jobs produced, nothing is timed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GOAL_RATIO = 0.6  # issue 6: the better plan's step time <= 0.6x the other's
PREDICTION_TOLERANCE = 0.25  # issue 6: predicted within +-25% of measured


def _by_key(points: list[Any]) -> dict[tuple[str, str, int], Any]:
    return {(p.scenario, p.plan, p.seq_len): p for p in points}


def table_rows(scenarios: list[Any], points: list[Any]) -> list[dict[str, Any]]:
    """One row per (scenario, seq_len): both plans, measured and predicted, and the ratio."""
    found = _by_key(points)
    rows = []
    for s in scenarios:
        ref_label, new_label = s.plans[0].label, s.plans[1].label
        for seq_len in s.seq_lens:
            ref, new = found.get((s.name, ref_label, seq_len)), found.get((s.name, new_label, seq_len))
            if ref is None or new is None:
                continue
            ratio = new.measured_fwd_s / ref.measured_fwd_s
            rows.append({
                "scenario": s.name, "seq_len": seq_len, "block_tokens": seq_len // s.world_size,
                "reference": ref_label, "plan": new_label,
                "reference_fwd_ms": 1e3 * ref.measured_fwd_s, "reference_pred_ms": 1e3 * ref.predicted_fwd_s,
                "plan_fwd_ms": 1e3 * new.measured_fwd_s, "plan_pred_ms": 1e3 * new.predicted_fwd_s,
                "reference_error": ref.error, "plan_error": new.error,
                "ratio_measured": ratio, "ratio_predicted": new.predicted_fwd_s / ref.predicted_fwd_s,
                "ratio_fwd_bwd_measured": (new.measured_fwd_s + new.measured_bwd_s) / (ref.measured_fwd_s + ref.measured_bwd_s),
                "reference_link_bound": ref.link_bound, "plan_link_bound": new.link_bound,
                "goal_met": ratio <= GOAL_RATIO,
                "within_tolerance": abs(ref.error) <= PREDICTION_TOLERANCE and abs(new.error) <= PREDICTION_TOLERANCE,
                "bytes_match": ref.bytes_match and new.bytes_match,
            })
    return rows


def print_table(scenarios: list[Any], points: list[Any]) -> list[dict[str, Any]]:
    """Plain text (pastes into the README): forward ms measured / predicted per plan."""
    rows = table_rows(scenarios, points)
    head = (
        f"{'scenario':9s} {'S':>6s} {'blk':>5s}  {'reference plan':20s} {'meas':>7s} {'pred':>7s} {'err':>5s}  "
        f"{'compared plan':20s} {'meas':>7s} {'pred':>7s} {'err':>5s}  {'ratio':>5s} {'pred':>5s} {'f+b':>5s}  bound  goal"
    )
    print("forward time of one ring attention call, ms (slowest rank, least of the iterations); ratio = compared / reference")
    print(head)
    print("-" * len(head))
    for r in rows:
        bound = ("L" if r["reference_link_bound"] else "C") + ("L" if r["plan_link_bound"] else "C")
        print(
            f"{r['scenario']:9s} {r['seq_len']:6d} {r['block_tokens']:5d}  {r['reference']:20s} "
            f"{r['reference_fwd_ms']:7.1f} {r['reference_pred_ms']:7.1f} {r['reference_error']:+5.0%}  "
            f"{r['plan']:20s} {r['plan_fwd_ms']:7.1f} {r['plan_pred_ms']:7.1f} {r['plan_error']:+5.0%}  "
            f"{r['ratio_measured']:5.2f} {r['ratio_predicted']:5.2f} {r['ratio_fwd_bwd_measured']:5.2f}  "
            f"{bound:5s}  {'met' if r['goal_met'] else 'NOT met'}"
        )
    print("bound: predicted regime of (reference, compared) plan, L = link-bound, C = compute-bound; "
          "f+b = forward+backward ratio; err = (predicted - measured) / measured")
    within = sum(r["within_tolerance"] for r in rows)
    print(f"prediction within +-{PREDICTION_TOLERANCE:.0%}: {within}/{len(rows)} rows (both plans of a row); "
          f"bytes per link class equal to the plan's: {sum(r['bytes_match'] for r in rows)}/{len(rows)} rows")
    return rows


def sweep_png(scenarios: list[Any], points: list[Any], path: Path) -> Path:
    """Forward time vs sequence length, one panel per scenario with a sweep, one solid line
    per plan (measured) and its dashed predicted line beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [s for s in scenarios if len(s.seq_lens) > 1] or list(scenarios)
    fig, axes = plt.subplots(1, len(swept), figsize=(6.4 * len(swept), 4.6), squeeze=False)
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange"]
    for ax, s in zip(axes[0], swept):
        for color, plan in zip(colors, s.plans):
            mine = sorted((p for p in points if p.scenario == s.name and p.plan == plan.label), key=lambda p: p.seq_len)
            if not mine:
                continue
            xs = [p.seq_len for p in mine]
            ax.plot(xs, [1e3 * p.measured_fwd_s for p in mine], "o-", color=color, label=f"{plan.label} (measured)")
            ax.plot(xs, [1e3 * p.predicted_fwd_s for p in mine], "s--", color=color, alpha=0.6,
                    label=f"{plan.label} (predicted)")
            bound = [p for p in mine if p.link_bound]
            if bound:
                ax.scatter([p.seq_len for p in bound], [1e3 * p.measured_fwd_s for p in bound], s=140,
                           facecolors="none", edgecolors=color, linewidths=1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens, whole sequence)")
        ax.set_ylabel("forward time per attention call (ms)")
        ax.set_title(f"{s.name}: {s.topology}, {s.fabric}\n(circled: predicted link-bound)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def wandb_run(out: Path, group: str, summary: dict[str, Any], rows: list[dict[str, Any]], png: Path) -> str:
    """One offline W&B run for the whole set: per-point metrics, the table, the plot."""
    import wandb

    run = wandb.init(
        mode="offline", dir=str(out), project="ringctl", group=group, name=f"{group}-summary",
        config={"workload": summary["workload"], "scenarios": summary["scenarios"]},
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    for step, p in enumerate(summary["points"]):
        key = f"{p['scenario']}/{p['plan']}"
        run.log({"seq_len": p["seq_len"], f"{key}/measured_fwd_ms": 1e3 * p["measured_fwd_s"],
                 f"{key}/predicted_fwd_ms": 1e3 * p["predicted_fwd_s"], f"{key}/error": p["error"]}, step=step)
    if rows:
        columns = list(rows[0])
        run.log({"table": wandb.Table(columns=list(columns), data=[[r[c] for c in columns] for r in rows]),
                 "sweep": wandb.Image(str(png))}, step=len(summary["points"]))
    for r in rows:
        run.summary[f"{r['scenario']}/S{r['seq_len']}/ratio"] = r["ratio_measured"]
    run_dir = Path(run.dir).parent
    run.finish()
    return f"wandb sync {run_dir}"
