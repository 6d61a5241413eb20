"""The serving benchmark's table (markdown, with ratios against a reference server) and chart."""

from __future__ import annotations

import os
from pathlib import Path


def machine_load() -> list[float]:
    """The 1, 5 and 15 minute load averages: on a shared machine they say how far to trust a run."""
    return [round(value, 2) for value in os.getloadavg()]


def _level_key(level: dict):
    return level["concurrency"] if level["concurrency"] is not None else level["request_rate"]


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f}"


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}×" if value is not None and reference else "—"


def format_table(report: dict, reference: str | None = None) -> str:
    """One markdown row per server and level; with `reference`, each row's output tok/s and TTFT p50
    as a multiple of that server's at the same level."""
    by_name = {server["name"]: server for server in report["servers"]}
    reference_levels = {_level_key(level): level for level in by_name[reference]["levels"]} \
        if reference in by_name else {}
    is_rate = bool(report["workload"].get("request_rates"))
    columns = ["server", "req/s in" if is_rate else "clients", "req/s", "output tok/s"]
    if reference_levels:
        columns += [f"tok/s vs {reference}", f"TTFT p50 vs {reference}"]
    columns += ["TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "E2E p50 s", "E2E p99 s",
                "tok/req", "failed", "peak RSS MB"]
    rows = []
    for server in report["servers"]:
        for level in server["levels"]:
            ref = reference_levels.get(_level_key(level), {})
            row = [server["name"], f"{_level_key(level)}", f"{level['request_throughput']:.2f}",
                   f"{level['output_tokens_per_s']:.1f}"]
            if reference_levels:
                row += [_ratio(level["output_tokens_per_s"], ref.get("output_tokens_per_s")),
                        _ratio(level["ttft_s_p50"], ref.get("ttft_s_p50"))]
            e2e = [level["e2e_s_p50"], level["e2e_s_p99"]]
            row += [_ms(level["ttft_s_p50"]), _ms(level["ttft_s_p99"]), _ms(level["itl_s_p50"]),
                    _ms(level["itl_s_p99"]), *("—" if v is None else f"{v:.2f}" for v in e2e),
                    "—" if level["mean_output_tokens"] is None else f"{level['mean_output_tokens']:.0f}",
                    f"{level['num_failures']}/{level['num_requests']}",
                    "—" if level.get("peak_rss_mb") is None else f"{level['peak_rss_mb']:.0f}"]
            rows.append(row)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    load = report["load_average"]
    lines.append(f"\nload average (1, 5, 15 min) at start {load['start']}, at end {load['end']}; "
                 f"{report['cpu_count']} CPUs")
    return "\n".join(lines)


def write_chart(report: dict, path: Path) -> None:
    """Output tok/s and TTFT p50 against concurrency (or request rate), one line per server."""
    import matplotlib
    matplotlib.use("Agg")  # no display: the chart only goes to a file
    from matplotlib import pyplot as plt

    is_rate = bool(report["workload"].get("request_rates"))
    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in report["servers"]:
        xs = [_level_key(level) for level in server["levels"]]
        throughput.plot(xs, [level["output_tokens_per_s"] for level in server["levels"]], marker="o",
                        label=server["name"])
        ttft.plot(xs, [level["ttft_s_p50"] for level in server["levels"]], marker="o", label=server["name"])
    ttft.set_yscale("log")  # from a fraction of a second to minutes: a linear axis hides the fast servers
    workload = report["workload"]
    for axes, title in ((throughput, "output tokens/s"), (ttft, "time to first token, p50 (s)")):
        axes.set_title(title)
        axes.set_xlabel("request rate (req/s)" if is_rate else "concurrent clients")
        levels = sorted({_level_key(level) for server in report["servers"] for level in server["levels"]})
        if len(levels) > 1:
            axes.set_xscale("log", base=2)
            axes.set_xticks(levels, [f"{x:g}" for x in levels])
            axes.minorticks_off()
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(f"{workload['prompt_tokens']} prompt tokens, {workload['output_tokens']} output tokens per "
                    f"request; load average {report['load_average']['start'][0]}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
