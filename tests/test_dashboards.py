"""Dashboards, alerts and deploy files against the real thing.

Every PromQL expression in deploy/ (dashboard panels, template variables,
alert rules) may name only metrics and labels that a live worker exports, and
every dashboard query returns data from a real Prometheus (Debian's
``prometheus`` binary) scraping two real workers under load. With
``TOOLQ_REQUIRE_PROMETHEUS=1`` a missing binary fails instead of skipping.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import missing
from toolq.producer import Client

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
TOOLQ_DASHBOARD = DEPLOY / "grafana" / "dashboards" / "toolq.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
REQUIRE_PROMETHEUS = os.environ.get("TOOLQ_REQUIRE_PROMETHEUS") == "1"

# Labels and series Prometheus itself adds to every scrape.
TARGET_LABELS = {"job", "instance"}
SYNTHETIC = {"up": TARGET_LABELS, "scrape_duration_seconds": TARGET_LABELS}
# What Grafana substitutes before it sends a query (All = ".*").
GRAFANA_VARS = {"$__rate_interval": "10s", "$__interval": "1s", "$job": ".*", "$instance": ".*"}
# Panels that must show real numbers (not only series) under load.
KEY_PANELS = {
    "Calls per second",
    "Calls per second by tool",
    "Failed calls per second by outcome",
    "Queue wait by tool",
    "Run time by tool",
    "Entries per read (batching)",
    "Slots by state",
    "Trajectories opened and ended",
    "Workers up",
    "Workers",
    "Heartbeat age",
    "Redis round trips and errors",
}


# ------------------------------------------------------------------ PromQL
_TOKEN = re.compile(
    r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`'  # strings
    r"|\[[^\]]*\]"  # range and subquery durations
    r"|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"  # numbers
    r"|[A-Za-z_:][A-Za-z0-9_:]*"  # identifiers
    r"|\S"
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count"}
_AGGREGATIONS |= {"count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
_KEYWORDS = _GROUPING | _AGGREGATIONS | {"bool", "and", "or", "unless", "offset", "inf", "nan"}


def promql_refs(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """``([(metric, labels matched on it)], labels used in grouping clauses)``."""
    tokens = [t for t in _TOKEN.findall(expr) if t[0] not in "\"'`["]
    selectors: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok in _GROUPING and nxt == "(":
            i += 2
            while i < len(tokens) and tokens[i] != ")":
                if tokens[i] != ",":
                    grouping.add(tokens[i])
                i += 1
        elif tok == "{":  # a selector with no metric name: {__name__=...}
            i, labels = _matchers(tokens, i)
            selectors.append(("", labels))
            continue
        elif re.match(r"[A-Za-z_:]", tok) and tok.lower() not in _KEYWORDS and nxt != "(":
            labels: set[str] = set()
            if nxt == "{":
                i, labels = _matchers(tokens, i + 1)
                selectors.append((tok, labels))
                continue
            selectors.append((tok, labels))
        i += 1
    return selectors, grouping


def _matchers(tokens: list[str], i: int) -> tuple[int, set[str]]:
    """Label names of the ``{...}`` starting at ``tokens[i]``; returns the index after it."""
    labels = set()
    i += 1
    while tokens[i] != "}":
        if re.match(r"[A-Za-z_]", tokens[i]):
            labels.add(tokens[i])
        i += 1
    return i + 1, labels


def test_promql_refs_finds_metrics_and_labels():
    selectors, grouping = promql_refs(
        'histogram_quantile(0.95, sum by (tool, le) (rate(m_bucket{a="x", b!~"y|z"}[5m])))'
        " / on (instance) group_left (worker) info_metric * 1e-9 > bool 2"
    )
    assert selectors == [("m_bucket", {"a", "b"}), ("info_metric", set())]
    assert grouping == {"tool", "le", "instance", "worker"}


# --------------------------------------------------------------- sources
def dashboard_panels(path: Path) -> list[dict[str, Any]]:
    """Every panel of a dashboard, rows' nested panels included."""
    out = []
    for panel in json.loads(path.read_text())["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """``(where, expr)`` for every query in every dashboard (panels and variables)."""
    found = []
    for path in DASHBOARDS:
        for panel in dashboard_panels(path):
            for t in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']} {t['refId']}", t["expr"]))
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] == "query":
                query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                found.append((f"{path.name}: variable {var['name']}", query))
    return found


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [
        (f"alert {rule['alert']}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    """The query as Grafana sends it with "All" selected (``variables``: what "All"
    stands for, see ``grafana_all``; default: match anything)."""
    for var, value in {**GRAFANA_VARS, **(variables or {})}.items():
        expr = expr.replace(var, value)
    return expr


def _regex_escape(value: str) -> str:
    """A label value as Grafana escapes it inside a multi-value regex."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\1", value)


def grafana_all(path: Path, label_values: Callable[[str, str], list[str]]) -> dict[str, str]:
    """``$var`` -> what Grafana substitutes for "All" of each query variable: its
    ``allValue`` if it has one, else every value its query finds, as ``(a|b)``.

    ``label_values(selector, label)`` asks Prometheus, as Grafana does.
    """
    out: dict[str, str] = {}
    for var in json.loads(path.read_text())["templating"]["list"]:
        if var["type"] != "query":
            continue
        if var.get("allValue"):
            out[f"${var['name']}"] = var["allValue"]
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        parts = label_values_query(query)
        assert parts, f"variable {var['name']}: not a label_values query"
        values = label_values(substitute(parts[0], out), parts[1])
        out[f"${var['name']}"] = "(" + "|".join(_regex_escape(v) for v in values) + ")"
    return out


def label_values_query(expr: str) -> tuple[str, str] | None:
    """``label_values(selector, label)`` (Grafana's variable query) -> its parts."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)\s*", expr)
    return (m.group(1), m.group(2)) if m else None


# ---------------------------------------------------------- live workers
def scrape_families(port: int) -> dict[str, set[str]]:
    """Sample name -> label names, from a worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def run_load(client: Client, stop: threading.Event, prefix: str, rounds: int = 2000) -> None:
    """Open, call (ok, failing, unknown tool), close, again: bounded in count."""
    for i in range(rounds):
        if stop.is_set():
            return
        traj = f"{prefix}-{i}"
        client.open(traj)
        client.call(traj, "bash", {"command": "echo load"})
        client.call(traj, "write_file", {"path": "f.txt", "content": "x"})
        client.call(traj, "bash", {"command": "exit 1"})
        if i % 5 == 0:
            client.call(traj, "no_such_tool", {})
            client.call(traj, "bg_start", {"command": "true"})
        client.close(traj)


@pytest.fixture
def loaded_workers(
    start_worker: Callable[..., Any], redis_url: str, ns: str
) -> Iterator[list[int]]:
    """Two real workers with metrics on free ports, under load until the test ends."""
    handles = [start_worker("local", slots=3, metrics_port=0, metrics_host="127.0.0.1")]
    handles.append(start_worker("local", slots=3, metrics_port=0, metrics_host="127.0.0.1"))
    stop = threading.Event()
    threads = []
    for n in range(2):
        client = Client(redis_url, ns)
        thread = threading.Thread(target=run_load, args=(client, stop, f"load{n}"), daemon=True)
        thread.start()
        threads.append(thread)
    ports = [h.worker.observer.port for h in handles]
    deadline = time.monotonic() + 30
    while "toolq_call_run_seconds_bucket" not in scrape_families(ports[0]):
        assert time.monotonic() < deadline, "no call finished on the first worker"
        time.sleep(0.05)
    yield ports
    stop.set()
    for thread in threads:
        thread.join(30)


def test_every_query_names_exported_metrics_and_labels(loaded_workers: list[int]):
    exported = {**SYNTHETIC}
    for port in loaded_workers:
        for name, labels in scrape_families(port).items():
            exported.setdefault(name, set()).update(labels | TARGET_LABELS)
    all_labels = set().union(*exported.values())
    exprs = dashboard_exprs() + alert_exprs()
    assert len(exprs) > 30
    problems = []
    for where, expr in exprs:
        parts = label_values_query(expr)
        if parts is not None:
            expr = parts[0]
            if parts[1] not in all_labels:
                problems.append(f"{where}: label {parts[1]!r} is not exported")
        selectors, grouping = promql_refs(substitute(expr))
        if not selectors:
            problems.append(f"{where}: names no metric")
        for metric, labels in selectors:
            if metric not in exported:
                problems.append(f"{where}: metric {metric!r} is not exported")
            elif labels - exported[metric]:
                problems.append(f"{where}: {metric} has no label {labels - exported[metric]}")
        if grouping - all_labels:
            problems.append(f"{where}: grouping by unknown labels {grouping - all_labels}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------- Prometheus
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        msg = "no prometheus binary (apt-get install prometheus)"
        if REQUIRE_PROMETHEUS:
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """A real Prometheus server on 127.0.0.1 scraping the given worker ports."""

    def __init__(self, binary: str, workdir: Path, worker_ports: list[int]) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "toolq-worker",
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in worker_ports]}],
                },
                {  # as deploy/prometheus/prometheus.yml does: "All" jobs must not count it
                    "job_name": "prometheus",
                    "static_configs": [{"targets": [self.url.removeprefix("http://")]}],
                },
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(workdir)

    def _wait_ready(self, workdir: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def label_values(self, selector: str, label: str) -> list[str]:
        """Values of ``label`` on the series ``selector`` matches (Grafana's label_values)."""
        return sorted(self.api(f"label/{label}/values", **{"match[]": selector}))

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def wait_for(self, expr: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.query(expr):
            assert time.monotonic() < deadline, f"no data for {expr}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def prometheus(loaded_workers: list[int], tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(prometheus_binary(), tmp_path, loaded_workers)
    yield server
    server.stop()


def panel_expr(title: str) -> str:
    """The one query of the toolq dashboard's panel ``title``."""
    (panel,) = [p for p in dashboard_panels(TOOLQ_DASHBOARD) if p["title"] == title]
    (target,) = panel["targets"]
    return str(target["expr"])


def _finite(result: list[dict[str, Any]]) -> list[float]:
    values = [float(series["value"][1]) for series in result]
    return [v for v in values if math.isfinite(v)]


def test_dashboard_queries_return_data_from_prometheus(prometheus: Prometheus):
    # Both workers scraped (and Prometheus itself), counters moving over a rate window.
    prometheus.wait_for('count(up{job="toolq-worker"} == 1) == 2')
    prometheus.wait_for('up{job="prometheus"} == 1')
    prometheus.wait_for("sum(rate(toolq_calls_total[10s])) > 0")
    prometheus.wait_for("sum(rate(toolq_call_run_seconds_count[10s])) > 0")
    empty, positive = [], set()
    for path in DASHBOARDS:
        variables = grafana_all(path, prometheus.label_values)
        for panel in dashboard_panels(path):
            for target in panel.get("targets", []):
                result = prometheus.query(substitute(target["expr"], variables))
                if not result:
                    empty.append(f"{panel['title']} {target['refId']}: {target['expr']}")
                if any(v > 0 for v in _finite(result)):
                    positive.add(panel["title"])
    assert not empty, "queries with no data:\n" + "\n".join(empty)
    assert KEY_PANELS - positive == set(), "key panels with no positive number"

    variables = grafana_all(TOOLQ_DASHBOARD, prometheus.label_values)
    assert variables["$job"] == "(toolq-worker)"  # not Prometheus's own job
    (up,) = prometheus.query(substitute(panel_expr("Workers up"), variables))
    assert float(up["value"][1]) == 2.0  # two workers; Prometheus itself is up too
    assert _finite(prometheus.query("count(up == 1)")) == [3.0]
    workers = prometheus.query(substitute('toolq_worker_info{job=~"$job"}', variables))
    assert {w["metric"]["backend"] for w in workers} == {"local"}
    assert len({w["metric"]["worker"] for w in workers}) == 2
    slots = _finite(prometheus.query("sum(toolq_slots)"))
    assert slots == [6.0]  # busy + idle + starting + free = 2 workers x 3 slots
    assert _finite(prometheus.query('sum(up{job="toolq-worker"})')) == [2.0]


def test_dashboard_variables_resolve_in_prometheus(prometheus: Prometheus):
    prometheus.wait_for("toolq_worker_info")
    for where, expr in dashboard_exprs():
        parts = label_values_query(expr)
        if parts is None:
            continue
        selector, label = parts
        values = prometheus.api(f"label/{label}/values", **{"match[]": substitute(selector)})
        assert values, f"{where}: no values for {expr}"
    jobs = prometheus.label_values("toolq_worker_info", "job")
    assert jobs == ["toolq-worker"]  # the Job variable offers toolq's jobs only


def test_alert_rules_load_and_evaluate(prometheus: Prometheus):
    names = {name.removeprefix("alert ") for name, _ in alert_exprs()}
    deadline = time.monotonic() + 30
    while True:
        groups = prometheus.api("rules")["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        evaluated = all(r.get("lastEvaluation", "").startswith("2") for r in rules.values())
        if set(rules) == names and evaluated:
            break
        assert time.monotonic() < deadline, f"rules not evaluated: {rules}"
        time.sleep(0.2)
    assert {name: r["health"] for name, r in rules.items()} == dict.fromkeys(names, "ok")
    # A healthy deployment under load (its failures are the tools' own) trips no outage alert.
    prometheus.wait_for("sum(rate(toolq_calls_total[5m])) > 0")
    exprs = dict(alert_exprs())
    for name in ("NoWorkers", "WorkerDown", "HighErrorRate", "RedisErrors", "HeartbeatStale"):
        assert prometheus.query(exprs[f"alert Toolq{name}"]) == [], name


# ------------------------------------------------------ static structure
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_importable(path: Path):
    """What Grafana needs to import or provision it without prompting."""
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    assert "id" not in dash  # an exported id would clash on import
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names[0] == "datasource" and dash["templating"]["list"][0]["query"] == "prometheus"
    panels = dashboard_panels(path)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        grid = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not grid & cells, f"panel {p['title']!r} overlaps another"
        cells |= grid
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_all_jobs_means_toolq_jobs_only(path: Path):
    """A catch-all "All" for the Job variable would match every job Prometheus
    scrapes (itself included): All must stand for the values its query finds."""
    (job,) = [v for v in json.loads(path.read_text())["templating"]["list"] if v["name"] == "job"]
    assert job["includeAll"] and not job.get("allValue")
    assert job["query"] == "label_values(toolq_worker_info, job)"


# ------------------------------------------------------ deploy references
ROOT = DEPLOY.parent
COMPOSE = DEPLOY / "docker-compose.yml"
# A file name or a deploy/ path inside any deploy file (a comment or a value).
_PATH_REF = re.compile(r"(?<![\w$:/.-])(/?[\w.-]+(?:/[\w.-]+)*\.(?:ya?ml|json)|deploy/[\w./-]+)")


def compose_mounts() -> dict[str, Path]:
    """Container path -> host path of every bind mount in the compose file."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            host, _, rest = volume.partition(":")
            if host.startswith("."):
                mounts[rest.split(":")[0]] = (DEPLOY / host).resolve()
    return mounts


def resolve_ref(ref: str, where: Path) -> Path | None:
    """Where a reference made in file ``where`` points, if that exists: absolute
    paths through the compose bind mounts, others beside the file or from the
    repository root (the commands in comments run there)."""
    if ref.startswith("/"):
        for inside, host in sorted(compose_mounts().items(), key=lambda m: -len(m[0])):
            if ref == inside or ref.startswith(inside.rstrip("/") + "/"):
                candidate = host / ref[len(inside) :].lstrip("/")
                return candidate if candidate.exists() else None
        raise AssertionError(f"{where}: {ref} is inside no mount of {COMPOSE.name}")
    for base in (where.parent, ROOT):
        if (base / ref).exists():
            return base / ref
    return None


def deploy_text_refs() -> list[tuple[Path, str]]:
    """``(file, reference)`` for every path-like reference in deploy/'s text files."""
    found = []
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix != ".json":  # dashboards name no files
            found += [(path, ref) for ref in _PATH_REF.findall(path.read_text())]
    return found


def structural_refs() -> list[tuple[Path, Path]]:
    """``(file, path)`` for what the configs load: Prometheus rule files, compose
    build contexts, Dockerfiles, bind mounts, and what each Dockerfile COPYs."""
    found: list[tuple[Path, Path]] = []
    for config in DEPLOY.rglob("prometheus*.yml"):
        loaded = yaml.safe_load(config.read_text())
        if "scrape_configs" in loaded:
            found += [(config, config.parent / rule) for rule in loaded.get("rule_files", [])]
    for service in yaml.safe_load(COMPOSE.read_text())["services"].values():
        build = service.get("build")
        if isinstance(build, dict):
            context = (DEPLOY / build["context"]).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            found += [(COMPOSE, context), (COMPOSE, dockerfile)]
            found += [(dockerfile, source) for source in copy_sources(dockerfile, context)]
    found += [(COMPOSE, host) for host in compose_mounts().values()]
    return found


def copy_sources(dockerfile: Path, context: Path) -> list[Path]:
    """What a Dockerfile COPYs from its build context (each glob's first match)."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            for source in words[1:-1]:
                matches = sorted(context.glob(source))
                sources.append(matches[0] if matches else context / source)
    return sources


def test_every_path_the_deploy_configs_reference_exists():
    text_refs = deploy_text_refs()
    assert len(text_refs) > 10  # the scan finds what it looks for
    missing = [f"{f.relative_to(ROOT)}: {ref}" for f, ref in text_refs if not resolve_ref(ref, f)]
    missing += [f"{f.relative_to(ROOT)}: {p}" for f, p in structural_refs() if not p.exists()]
    assert not missing, "references to nothing:\n" + "\n".join(missing)


def test_grafana_provisioning_matches_compose():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if ":" in v)
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/toolq.yml").read_text())[
        "providers"
    ][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"


def test_compose_file_runs_the_whole_stack():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "worker", "rq-worker", "prometheus", "grafana"} <= set(services)
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--appendfsync everysec" in redis_cmd
    worker = services["worker"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in worker["volumes"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    port = int(worker["environment"]["TOOLQ_METRICS_PORT"])
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "toolq-worker")
    assert job["dns_sd_configs"][0] == {
        "names": ["worker"],
        "type": "A",
        "port": port,
        "refresh_interval": "10s",
    }


def test_compose_config_validates():
    binary = shutil.which("docker-compose")
    if binary is None:
        missing("no docker-compose binary (apt-get install docker-compose)")
    proc = subprocess.run(
        [binary, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_prometheus_config_and_rules_validate():
    prometheus_binary()
    promtool = shutil.which("promtool")
    assert promtool, "prometheus is installed without promtool"
    for args in (["check", "config", str(DEPLOY / "prometheus/prometheus.yml")],):
        proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_k8s_manifests_wire_docker_and_scraping():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s/worker.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    config = by_kind["ConfigMap"]["data"]
    deployment = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    port = int(config["TOOLQ_METRICS_PORT"])
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == port
    assert container["ports"][0]["containerPort"] == port
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/run/docker.sock" in mounts or config.get("DOCKER_HOST", "").startswith("tcp")
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert by_kind["Service"]["spec"]["selector"].items() <= labels.items()
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 30
    scrape = yaml.safe_load((DEPLOY / "k8s/prometheus-scrape.yml").read_text())
    keep = scrape["scrape_configs"][0]["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == labels["app.kubernetes.io/name"]
