"""The shipped monitoring: Prometheus alert rules and the Grafana dashboard, checked with
Debian's promtool (scripts/bootstrap --test installs it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "conf" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "conf" / "grafana" / "relayd.json"
# what Grafana puts in a query before Prometheus sees it
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


def queries() -> list[str]:
    """Every query of the dashboard's panels, its variables replaced as Grafana does."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            found.append(expr)
    return found


def test_the_alert_rules_are_valid_and_pass_their_unit_tests():
    checked = promtool("check", "config", "conf/prometheus/prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 13 rules found" in checked.stdout
    tested = promtool("test", "rules", "tests/prometheus/alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path):
    """The unit tests can fail: a deferral threshold of 50 % misses the 29 % case."""
    rules = tmp_path / "conf" / "prometheus"
    rules.mkdir(parents=True)
    text = RULES.read_text()
    assert text.count("/ relayd:attempts:increase10m > 0.20") == 1
    (rules / "alerts.yml").write_text(text.replace("increase10m > 0.20", "increase10m > 0.50"))
    case = tmp_path / "tests" / "prometheus"
    case.mkdir(parents=True)
    (case / "alerts_test.yml").write_text((ROOT / "tests/prometheus/alerts_test.yml").read_text())
    tested = subprocess.run(
        ["promtool", "test", "rules", str(case / "alerts_test.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert tested.returncode == 1
    assert "alertname: RelaydDeferralRate" in tested.stdout + tested.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path):
    exprs = queries()
    assert len(exprs) >= 25
    rules: dict[str, Any] = {
        "groups": [
            {"name": "dashboard", "rules": [
                {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)
            ]}
        ]
    }  # fmt: skip
    path = tmp_path / "dashboard_rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_is_laid_out_on_grafanas_grid():
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
