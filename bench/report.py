"""Turn a run's JSON into the Markdown report and the PNG plots."""

from __future__ import annotations

import math
import os
from typing import Any

NOTES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.md")

# path -> (label in tables and plots, what one call is)
PATHS: dict[str, tuple[str, str]] = {
    "toolq": ("toolq (Docker)", "AsyncClient.call → Redis → worker process → agent in container"),
    "limit": ("limit (agent stream)", "the same request straight to the in-container agent"),
    "rq": ("RQ + docker exec", "one RQ job per call, docker-py exec_run in the trajectory's box"),
    "exec": ("docker exec (SDK)", "docker-py exec_run from the benchmark process, no queue"),
    "exec_cli": ("docker exec (CLI)", "`docker exec` as a process per call"),
    "toolq_local": ("toolq (local)", "the toolq path with the local backend (agent subprocesses)"),
    "limit_local": ("limit (local agent)", "the request straight to a local agent subprocess"),
    "relay_agent": (
        "relay + agent (no toolq)",
        "bench/relay_agent.py: XADD → relay process (XREADGROUP, the agent over its stream,"
        " XADD) → XREAD: the simplest program doing toolq's hops and the agent's",
    ),
    "relay": (
        "relay floor (no tool)",
        "bench/relay.py: XADD → relay process (XREADGROUP, XADD) → XREAD, the same Redis hops"
        " as toolq's; measured before and after the Docker paths",
    ),
}
ORDER = list(PATHS)
TOOLS = ["true", "cat", "write_64k", "out_1mb"]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _find(rows: list[dict[str, Any]], path: str, tool: str, conc: int) -> dict[str, Any] | None:
    for row in rows:
        if row["path"] == path and row["tool"] == tool and row["concurrency"] == conc:
            return row
    return None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios to the limit and to the RQ baseline at the same tool and concurrency
    (a ``--runtimes`` row, ``toolq_runsc``, to the limit of its own runtime)."""
    for row in rows:
        own = f"limit_{row['runtime']}" if row.get("runtime") else "limit"
        limit = _find(rows, own, row["tool"], row["concurrency"])
        rq = _find(rows, "rq", row["tool"], row["concurrency"])
        row["p50_x_limit"] = _ratio(row["p50_ms"], limit and limit["p50_ms"])
        row["tput_x_limit"] = _ratio(row["calls_per_s"], limit and limit["calls_per_s"])
        row["tput_x_rq"] = _ratio(row["calls_per_s"], rq and rq["calls_per_s"])
        row["rq_p50_x"] = _ratio(rq and rq["p50_ms"], row["p50_ms"])


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return round(a / b, 2)


ROW_HEAD = (
    "| path | tool | trajectories | calls | errors | p50 ms | p99 ms | calls/s "
    "| p50 ÷ limit p50 | calls/s ÷ limit | calls/s ÷ RQ | RQ p50 ÷ p50 |\n"
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def _row(row: dict[str, Any]) -> str:
    cells = [
        PATHS.get(row["path"], (row["path"], ""))[0],
        f"`{row['tool']}`",
        str(row["concurrency"]),
        str(row["n"]),
        str(row["errors"]),
        _fmt(row["p50_ms"]),
        _fmt(row["p99_ms"]),
        _fmt(row["calls_per_s"], 1),
        _fmt(row.get("p50_x_limit")),
        _fmt(row.get("tput_x_limit")),
        _fmt(row.get("tput_x_rq"), 1),
        _fmt(row.get("rq_p50_x"), 1),
    ]
    return "| " + " | ".join(cells) + " |"


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r: dict[str, Any]) -> tuple[int, int, int]:
        tool = TOOLS.index(r["tool"]) if r["tool"] in TOOLS else 99
        path = ORDER.index(r["path"]) if r["path"] in ORDER else 99
        return r["concurrency"], tool, path

    return sorted(rows, key=key)


def relay_agent(rows: list[dict[str, Any]], out: list[tuple[str, str, bool | None]]) -> None:
    """toolq beside the simplest program doing its hops and the agent's (``relay_agent``):
    what toolq's own work costs, with the machine's share of the hops taken out."""
    for tool in TOOLS:
        mine, limit = _find(rows, "toolq", tool, 1), _find(rows, "limit", tool, 1)
        bare = _find(rows, "relay_agent", tool, 1)
        if mine and limit and bare and bare["p50_ms"] > limit["p50_ms"]:
            ours, theirs = mine["p50_ms"] - limit["p50_ms"], bare["p50_ms"] - limit["p50_ms"]
            out.append(
                (
                    f"`{tool}`, 1 trajectory: toolq's p50 over the limit ≤ 1.25x relay_agent's",
                    f"{ours:.2f} vs {theirs:.2f} ms = {ours / theirs:.2f}x",
                    ours / theirs <= 1.25,
                )
            )
    top = max((r["concurrency"] for r in rows if r["path"] == "relay_agent"), default=0)
    mine, bare = _find(rows, "toolq", "true", top), _find(rows, "relay_agent", "true", top)
    if top > 1 and mine and bare:
        r = mine["calls_per_s"] / bare["calls_per_s"]
        out.append(
            (
                f"{top} trajectories: calls/s ≥ 0.95x relay_agent's",
                f"{mine['calls_per_s']:.0f} vs {bare['calls_per_s']:.0f} = {r:.2f}x",
                r >= 0.95,
            )
        )


def targets(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, met?) for each goal of the performance issue."""
    rows = report["rows"]
    out: list[tuple[str, str, bool | None]] = []

    def latency(tool: str, goal: float) -> None:
        mine, limit = _find(rows, "toolq", tool, 1), _find(rows, "limit", tool, 1)
        if mine and limit:
            r = mine["p50_ms"] / limit["p50_ms"]
            out.append(
                (
                    f"`{tool}`, 1 trajectory: p50 ≤ {goal}x the limit's",
                    f"{mine['p50_ms']:.2f} vs {limit['p50_ms']:.2f} ms = {r:.2f}x",
                    r <= goal,
                )
            )

    floor = _find(rows, "relay", "floor", 1)
    mine, limit = _find(rows, "toolq", "true", 1), _find(rows, "limit", "true", 1)
    if floor and mine and limit:
        added = mine["p50_ms"] - limit["p50_ms"]
        r = added / floor["p50_ms"]
        out.append(
            (
                "`true`, 1 trajectory: toolq p50 - limit p50 ≤ 2x the relay floor's p50",
                f"{mine['p50_ms']:.2f} - {limit['p50_ms']:.2f} = {added:.2f} ms"
                f" = {r:.1f}x the floor ({floor['p50_ms']:.2f} ms)",
                r <= 2,
            )
        )
    relay_agent(rows, out)
    latency("write_64k", 1.5)
    latency("out_1mb", 1.3)
    mine64, limit64 = _find(rows, "toolq", "true", 64), _find(rows, "limit", "true", 64)
    if mine64 and limit64:
        r = mine64["calls_per_s"] / limit64["calls_per_s"]
        out.append(
            (
                "64 trajectories: calls/s ≥ 0.9x the limit's",
                f"{mine64['calls_per_s']:.0f} vs {limit64['calls_per_s']:.0f} = {r:.2f}x",
                r >= 0.9,
            )
        )
    if mine64 and "server_cmds_per_call" in mine64:
        cmds, cpu = mine64["server_cmds_per_call"], mine64.get("worker_cpu_ms_per_call", 0.0)
        out.append(
            (
                "Redis commands per call on the server, Lua included, ≤ 10 (64 trajectories)",
                f"{cmds:.1f}",
                cmds <= 10,
            )
        )
        out.append(
            ("worker CPU per call at 64 trajectories ≤ 0.25 ms", f"{cpu:.3f} ms", cpu <= 0.25)
        )
    beside = report.get("beside") or {}
    if "toolq" in beside and "limit" in beside:
        mine, limit = beside["toolq"], beside["limit"]
        r = mine["during_p50_ms"] / max(mine["before_p50_ms"], 1e-9)
        r_limit = limit["during_p50_ms"] / max(limit["before_p50_ms"], 1e-9)
        out.append(
            (
                f"{beside['opened']} trajectories opened at once: calls of "
                f"{beside['running']} running ones not held up (p50 slows no more than "
                "the limit's while as many containers start)",
                f"toolq p50 {mine['before_p50_ms']:.1f} → {mine['during_p50_ms']:.1f} ms "
                f"({r:.1f}x), limit {limit['before_p50_ms']:.1f} → "
                f"{limit['during_p50_ms']:.1f} ms ({r_limit:.1f}x)",
                r <= r_limit * 1.25,
            )
        )
    big = max((r["concurrency"] for r in rows if r["path"] == "rq"), default=0)
    toolq_rq, rq = _find(rows, "toolq", "true", big), _find(rows, "rq", "true", big)
    if toolq_rq and rq:
        r = toolq_rq["calls_per_s"] / rq["calls_per_s"]
        out.append(
            (
                f"{big} trajectories: ≥ 20x the calls/s of RQ + docker exec",
                f"{toolq_rq['calls_per_s']:.0f} vs {rq['calls_per_s']:.1f} = {r:.0f}x",
                r >= 20,
            )
        )
    top = max((r["concurrency"] for r in rows if r["path"] == "toolq"), default=0)
    scale = _find(rows, "toolq", "true", top)
    if scale and top > 64:
        r = scale["p99_ms"] / scale["p50_ms"]
        mem = next((m for k, m in report.get("memory", {}).items() if f"{top} traj" in k), {})
        extra = ""
        if mem:
            extra = (
                f"; worker RSS {mem.get('worker_rss_mib', 0):.0f} MiB, "
                f"Redis used_memory {mem.get('redis_used_mib', 0):.0f} MiB (all the run stored)"
            )
        out.append(
            (
                f"{top} trajectories: 0 errors, p99 ≤ 1.5x p50",
                f"{scale['errors']} errors, p99 {scale['p99_ms']:.0f} ms = {r:.1f}x p50{extra}",
                scale["errors"] == 0 and r <= 1.5,
            )
        )
    return out


def _beside_section(report: dict[str, Any]) -> list[str]:
    b = report.get("beside") or {}
    if "toolq" not in b:
        return []
    lines = [
        "",
        "## Claims beside running calls",
        "",
        f"{b['running']} trajectories call `true` in a loop; then {b['opened']} more are "
        "opened at once (a container each). Their latency before, and while the others "
        "are claimed and their containers start; for the limit, while the benchmark "
        "process starts as many containers itself (what the starts alone cost here).",
        "",
        "| path | p50 ms before | p99 ms before | calls during | p50 ms during "
        "| p99 ms during | max ms during | opened: first result p50 / max s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name in ("toolq", "limit"):
        m = b.get(name)
        if m:
            lines.append(
                f"| {name} | {_fmt(m['before_p50_ms'])} | {_fmt(m['before_p99_ms'])} "
                f"| {m['during_n']} | {_fmt(m['during_p50_ms'])} | {_fmt(m['during_p99_ms'])} "
                f"| {_fmt(m['during_max_ms'])} | {_fmt(m['opened_ready_p50_s'])} / "
                f"{_fmt(m['opened_ready_max_s'])} |"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    host = report["host"]
    cfg = report["config"]
    lines = [
        "# toolq benchmark results",
        "",
        f"Measured {report['started']} with `{report['command']}` "
        f"({report['elapsed_s']:.0f} s end to end). Written by `bench/run.py`; "
        "the tables below are generated, the notes at the end explain them.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    for key in (
        "cpu",
        "cpus",
        "mem_gib",
        "kernel",
        "docker_engine",
        "redis",
        "python",
        "commit",
    ):
        if key in host:
            lines.append(f"| {key} | {host[key]} |")
    for key in ("redis_py", "rq"):
        if key in host:
            lines.append(f"| {key} | {host[key]} |")
    for key in ("loadavg_start", "loadavg_end"):
        if host.get(key):
            when = key.removeprefix("loadavg_")
            lines.append(
                f"| load average (1, 5, 15 min) at {when} | "
                + ", ".join(f"{x:.2f}" for x in host[key])
                + " |"
            )
    lines += ["", "## Targets (ratios measured in the same run)", ""]
    lines += ["| target | measured | met |", "|---|---|---|"]
    for name, measured, met in targets(report):
        mark = "reported" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {name} | {measured} | {mark} |")
    one = [r for r in rows if r["concurrency"] == 1]
    lines += [
        "",
        "## One trajectory: latency per tool call",
        "",
        "Each call waits for the previous one's result. Ratios compare with the limit "
        "and the RQ baseline for the same tool and number of trajectories.",
        "",
        ROW_HEAD,
    ]
    lines += [_row(r) for r in _sorted(one)]
    lines += _stages_section(one)
    many = [r for r in rows if r["concurrency"] > 1]
    lines += [
        "",
        "## Throughput against concurrency (`true`)",
        "",
        "N trajectories at once, each calling again as soon as its result arrives.",
        "",
        ROW_HEAD,
    ]
    lines += [_row(r) for r in _sorted(many)]
    lines += _redis_section(rows) + _memory_section(report) + _beside_section(report)
    lines += _lifecycle_section(report) + _runtime_section(report)
    lines += ["", "## How it was run", ""]
    lines += [f"- **{label}**: {what}" for label, what in PATHS.values()]
    lines += ["", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in cfg.items()) + "."]
    if os.path.exists(NOTES):  # the hand-written findings that go with the figures
        with open(NOTES) as fh:
            lines += ["", fh.read().strip()]
    return "\n".join(lines) + "\n"


def _stages_section(one: list[dict[str, Any]]) -> list[str]:
    """Where a toolq call's time goes at one trajectory: the median of each stage,
    from the result's ``stages`` and the client's submit and wake-up times."""
    staged = [r for r in _sorted(one) if r.get("stages_ms")]
    if not staged:
        return []
    names = list(staged[0]["stages_ms"])
    lines = [
        "",
        "### One trajectory: where a toolq call's time goes",
        "",
        "Medians per stage, in ms, from each result's `stages` (worker and sandbox) and the "
        "client's own times (`submitted`, `woken`); one host's clock. `tool` is the tool "
        "itself in the sandbox; the rest is toolq and Redis.",
        "",
        "| path | tool | " + " | ".join(names) + " | toolq (all but tool) |",
        "|---|---|" + "--:|" * (len(names) + 1),
    ]
    for r in staged:
        st = r["stages_ms"]
        cells = [_fmt(st.get(n), 3) for n in names]
        toolq = sum(v for n, v in st.items() if n != "tool")
        lines.append(
            f"| {PATHS.get(r['path'], (r['path'], ''))[0]} | `{r['tool']}` | "
            + " | ".join(cells)
            + f" | {_fmt(toolq, 3)} |"
        )
    return lines


def _redis_section(rows: list[dict[str, Any]]) -> list[str]:
    counted = [r for r in rows if "client_rt_per_call" in r]
    if not counted:
        return []
    lines = [
        "",
        "## Redis round trips per call",
        "",
        "Counted in redis-py (a pipeline is one round trip) in the client process and in "
        "the worker process; server commands from `INFO commandstats` (heartbeats included); "
        "CPU per call of the worker process (`/proc`) and of the Redis server (`INFO cpu`), "
        "everything they did during the run divided by the calls.",
        "",
        "| path | tool | trajectories | client round trips | client commands "
        "| worker round trips | worker commands | server commands (incl. inside Lua) "
        "| worker CPU ms | Redis CPU µs |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in _sorted(counted):
        lines.append(
            f"| {PATHS.get(r['path'], (r['path'],))[0]} | `{r['tool']}` | {r['concurrency']} "
            f"| {r['client_rt_per_call']:.2f} | {r['client_cmds_per_call']:.2f} "
            f"| {r['worker_rt_per_call']:.2f} | {r['worker_cmds_per_call']:.2f} "
            f"| {r['server_cmds_per_call']:.2f} | {r.get('worker_cpu_ms_per_call', 0):.3f} "
            f"| {r.get('redis_cpu_us_per_call', 0):.0f} |"
        )
    return lines


def _memory_section(report: dict[str, Any]) -> list[str]:
    memory = report.get("memory") or {}
    if not memory:
        return []
    lines = [
        "",
        "## Memory per idle slot",
        "",
        "Container: `docker stats` MEM USAGE (cgroup usage less inactive file cache), "
        "averaged over sampled containers, divided by slots per container. Worker: growth "
        "of the worker's RSS from before opening to all slots open, per slot.",
        "",
        "| setup | slots | slots per container | container MiB | container MiB per slot "
        "| worker RSS KiB per slot | worker RSS MiB "
        "| Redis used_memory MiB (all the run stored so far) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, m in memory.items():
        lines.append(
            f"| {name} | {m['slots']} | {m.get('per_container', '-')} "
            f"| {_fmt(m.get('container_mib'), 1)} | {_fmt(m.get('container_mib_per_slot'), 1)} "
            f"| {_fmt(m.get('worker_kib_per_slot'), 0)} | {_fmt(m.get('worker_rss_mib'), 0)} "
            f"| {_fmt(m.get('redis_used_mib'), 0)} |"
        )
    return lines


def _lifecycle_section(report: dict[str, Any]) -> list[str]:
    life = report.get("lifecycle") or {}
    if not life:
        return []
    lines = [
        "",
        "## Container lifecycle",
        "",
        "From `open` to the first call's result, as a client sees it.",
        "",
        "| what | samples | p50 s | max s | note |",
        "|---|--:|--:|--:|---|",
    ]
    for name, m in life.items():
        lines.append(
            f"| {name} | {m['n']} | {_fmt(m['p50_s'])} | {_fmt(m['max_s'])} | {m.get('note', '')} |"
        )
    return lines


def _runtime_section(report: dict[str, Any]) -> list[str]:
    """``--runtimes``: each runtime's limit and toolq, measured interleaved in one
    stage. The runtime's cost is its limit over runc's; toolq's own cost is its p50
    minus its runtime's limit p50 (what toolq adds on top of the agent stream)."""
    runtimes = report.get("config", {}).get("runtimes") or []
    rows = report["rows"]
    if len(runtimes) < 2 or not any(r.get("runtime") for r in rows):
        return []
    base = runtimes[0]
    head = ["tool", "trajectories"]
    for rt in runtimes:
        head += [f"limit {rt} p50 ms", f"toolq {rt} p50 ms", f"toolq adds ({rt}) ms"]
        head += [f"relay_agent adds ({rt}) ms"]
    head += [f"{rt} limit ÷ {base}" for rt in runtimes[1:]]
    head += [f"toolq calls/s {rt}" for rt in runtimes]
    head += [f"worker CPU ms/call {rt}" for rt in runtimes]
    lines = [
        "",
        "## Docker runtimes (`--runtimes`)",
        "",
        f"The same calls under each runtime, interleaved in one stage. `÷ {base}`: what "
        "the runtime costs the agent stream (the limit); `toolq adds`: toolq's p50 minus "
        "the limit's p50 under the same runtime (noisy on a loaded host); `relay_agent "
        "adds`: the same for the simplest program doing toolq's hops (`bench/relay_agent.py`) "
        "under that runtime; worker CPU per call: toolq's own work, which wall-clock noise "
        "does not inflate.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "--:|" * (len(head) - 1),
    ]
    keys = sorted(
        {(r["tool"], r["concurrency"]) for r in rows if r.get("runtime")},
        key=lambda k: (k[1], TOOLS.index(k[0]) if k[0] in TOOLS else 99),
    )
    for tool, conc in keys:
        cells = [f"`{tool}`", str(conc)]
        limits, tputs, cpus = {}, [], []
        for rt in runtimes:
            lim = _find(rows, f"limit_{rt}", tool, conc)
            mine = _find(rows, f"toolq_{rt}", tool, conc)
            limits[rt] = lim and lim["p50_ms"]
            adds = mine["p50_ms"] - lim["p50_ms"] if mine and lim else None
            relay = _find(rows, f"relay_agent_{rt}", tool, conc)
            relay_adds = relay["p50_ms"] - lim["p50_ms"] if relay and lim else None
            cells += [_fmt(limits[rt]), _fmt(mine and mine["p50_ms"]), _fmt(adds)]
            cells += [_fmt(relay_adds)]
            tputs.append(_fmt(mine and mine["calls_per_s"]))
            cpus.append(_fmt(mine and mine.get("worker_cpu_ms_per_call")))
        cells += [_fmt(_ratio(limits[rt], limits[base])) for rt in runtimes[1:]]
        lines.append("| " + " | ".join(cells + tputs + cpus) + " |")
    return lines


# -- plots ----------------------------------------------------------------------------
COLORS = {
    "toolq": "#1f77b4",
    "limit": "#2ca02c",
    "rq": "#d62728",
    "exec": "#ff7f0e",
    "exec_cli": "#8c564b",
    "toolq_local": "#9467bd",
    "limit_local": "#17becf",
}


def plots(report: dict[str, Any], out_prefix: str) -> dict[str, str]:
    """latency.png, throughput.png and results.png (both side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    _latency(left, report)
    _throughput(right, report)
    fig.suptitle(f"toolq vs the limit and RQ + docker exec — {report['host'].get('cpus')} cores")
    fig.tight_layout()
    written["results"] = out_prefix + "results.png"
    fig.savefig(written["results"], dpi=110)
    plt.close(fig)
    for name, draw in (("latency", _latency), ("throughput", _throughput)):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        draw(ax, report)
        fig.tight_layout()
        written[name] = f"{out_prefix}{name}.png"
        fig.savefig(written[name], dpi=110)
        plt.close(fig)
    return written


def _latency(ax: Any, report: dict[str, Any]) -> None:
    samples = report["samples_ms"]
    conc = sorted({int(k.split("|")[2]) for k in samples})
    shown = [c for c in conc if c in (1, 64)] or conc[:1]
    for key, values in sorted(samples.items()):
        path, tool, c = key.split("|")
        if tool != "true" or int(c) not in shown or not values:
            continue
        ordered = sorted(values)
        ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
        style = "-" if int(c) == shown[0] else "--"
        label = f"{PATHS.get(path, (path,))[0]}, {c} traj"
        ax.step(ordered, ys, style, where="post", color=COLORS.get(path), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency per call, ms (log)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("Latency distribution of `true` (solid: 1 trajectory, dashed: 64)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _throughput(ax: Any, report: dict[str, Any]) -> None:
    rows = [r for r in report["rows"] if r["tool"] == "true"]
    for path in ORDER:
        pts = sorted((r["concurrency"], r["calls_per_s"]) for r in rows if r["path"] == path)
        if len(pts) < 2:
            continue
        xs, ys = zip(*pts, strict=True)
        label = PATHS[path][0]
        ax.plot(xs, ys, "o-", color=COLORS.get(path), label=label)
    levels = sorted({r["concurrency"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_yscale("log")
    ax.set_xlabel("concurrent trajectories (log)")
    ax.set_ylabel("calls/s (log)")
    ax.set_title("Throughput of `true` against concurrency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
