"""The README's performance table, written from the same run as bench/RESULTS.md.

``python bench/run.py --publish`` replaces the lines between the two markers
below in README.md, so the README never quotes figures from another run.
"""

from __future__ import annotations

import os
from typing import Any

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN = "<!-- bench table: written by bench/run.py --publish -->"
END = "<!-- end of bench table -->"

HEAD = (
    "| path (`true`, Docker sandbox) | trajectories | p50 ms | p99 ms | calls/s "
    "| vs the limit | vs RQ |\n|---|--:|--:|--:|--:|--:|--:|"
)
LABELS = {
    "toolq": "toolq end to end (client → Redis → worker → agent → back)",
    "limit": "the limit: the agent's stream, no Redis, no worker",
    "rq": "RQ job per call doing `docker exec` (4 RQ workers)",
    "exec": "`docker exec` alone (SDK)",
}


def _num(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 10 else f"{value:.2f}"


def _ratio(value: float | None, what: str) -> str:
    return "" if value is None else f"{what}{value:.2f}x"


def _per_container(config: dict[str, Any], conc: int) -> int:
    if conc == config.get("scale"):
        return int(config["scale_pack"])
    return int(config["pack"]) if conc > config["pack_above"] else 1


def rows(report: dict[str, Any]) -> list[str]:
    """The table's lines: `true` on Docker, 1 trajectory, 64, and every larger level."""
    out = [HEAD]
    found = [r for r in report["rows"] if r["tool"] == "true" and r["path"] in LABELS]
    for row in sorted(found, key=lambda r: (r["concurrency"], list(LABELS).index(r["path"]))):
        conc = row["concurrency"]
        if conc > 1 and row["path"] not in ("toolq", "rq"):
            continue
        label = LABELS[row["path"]] if conc == 1 else LABELS[row["path"]].split(" (")[0]
        per = _per_container(report["config"], conc)
        if per > 1:
            label += f" ({per} trajectories per container)"
        calls = _num(row["calls_per_s"]) + (f", {row['errors']} errors" if conc > 64 else "")
        vs_limit = (
            _ratio(row.get("p50_x_limit"), "p50 ")
            if conc == 1
            else _ratio(row.get("tput_x_limit"), "calls/s ")
        )
        vs_rq = _ratio(row.get("tput_x_rq"), "calls/s ")
        cells = [label, f"{conc:,}", _num(row["p50_ms"]), _num(row["p99_ms"]), calls]
        out.append("| " + " | ".join([*cells, vs_limit, vs_rq]) + " |")
    return out


def publish(report: dict[str, Any], readme: str = README) -> None:
    """Replace the table between the markers in README.md (which must hold both)."""
    with open(readme) as fh:
        text = fh.read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    table = "\n".join(rows(report))
    with open(readme, "w") as fh:
        fh.write(text[:start] + "\n" + table + "\n" + text[end:])
