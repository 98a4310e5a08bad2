#!/usr/bin/env python3
"""Writes dashboards/pgtide.json, the Grafana dashboard over pgtide's metrics.

Edit the panels here and run `python3 dashboards/generate.py`; the integration test
`metrics::dashboard_uses_only_metrics_pgtide_exports` checks that every pgtide_ metric the
dashboard queries exists in a real scrape. Python 3 standard library only.
"""
import os
import json
DS = {"type": "prometheus", "uid": "${datasource}"}
F = '{database=~"$database"}'
R = "$__rate_interval"
panels = []
y = 0
pid = 0
def row(title):
    global y, pid
    pid += 1
    panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1
x = 0
def panel(title, targets, unit="short", kind="timeseries", w=8, h=8, desc=""):
    global x, y, pid
    if x + w > 24:
        x = 0; y += h
    pid += 1
    p = {"type": kind, "title": title, "id": pid, "datasource": DS, "description": desc,
         "gridPos": {"h": h, "w": w, "x": x, "y": y},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {},
         "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
                     for i, (e, l) in enumerate(targets)]}
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    panels.append(p)
    x += w
def endrow():
    global x, y
    x = 0; y += 8

def q(quant, metric):
    return f'histogram_quantile({quant}, sum by (le) (rate({metric}_bucket{F}[{R}])))'

row("Throughput and latency")
panel("Transactions / s", [(f"sum by (database) (rate(pgtide_transactions_total{F}[{R}]))", "{{database}}")], "ops")
panel("Queries / s", [(f"sum by (database) (rate(pgtide_queries_total{F}[{R}]))", "{{database}}")], "ops")
panel("Bytes / s", [(f"sum(rate(pgtide_bytes_received_total{F}[{R}]))", "from clients"),
                    (f"sum(rate(pgtide_bytes_sent_total{F}[{R}]))", "to clients")], "Bps")
endrow()
panel("Transaction duration (p50 / p95 / p99)", [(q(v, "pgtide_transaction_seconds"), f"p{int(v*100)}") for v in (0.5, 0.95, 0.99)], "s")
panel("Query duration (p50 / p95 / p99)", [(q(v, "pgtide_query_seconds"), f"p{int(v*100)}") for v in (0.5, 0.95, 0.99)], "s")
panel("Errors / s by SQLSTATE class", [(f"sum by (class) (rate(pgtide_errors_total{F}[{R}]))", "{{class}}")], "ops")
endrow()
row("Pools and waiting")
panel("Wait for a server (p50 / p99) and longest current wait",
      [(q(0.5, "pgtide_wait_seconds"), "p50"), (q(0.99, "pgtide_wait_seconds"), "p99"),
       (f"max(pgtide_longest_wait_seconds{F})", "longest current wait")], "s")
panel("Clients by state", [(f"sum by (state) (pgtide_clients{F})", "{{state}}")])
panel("Server connections by state", [(f"sum by (state) (pgtide_servers{F})", "{{state}}")])
endrow()
panel("Pool saturation (active / open server connections)",
      [(f'sum by (database, user, host) (pgtide_servers{{database=~"$database",state="active"}}) / '
        f'sum by (database, user, host) (pgtide_servers{F})', "{{database}}/{{user}} @ {{host}}")],
      "percentunit", desc="1 means every open server connection is busy; with clients waiting, raise pool_size.")
panel("Waiting clients", [(f'sum by (database, user) (pgtide_clients{{database=~"$database",state="waiting"}})', "{{database}}/{{user}}")])
panel("Pool timeouts, server connects, failures / s",
      [(f"sum(rate(pgtide_pool_timeouts_total{F}[{R}]))", "pool timeouts"),
       (f"sum(rate(pgtide_server_connects_total{F}[{R}]))", "server connects"),
       (f"sum(rate(pgtide_server_connect_failures_total{F}[{R}]))", "server connect failures"),
       (f"rate(pgtide_auth_failures_total[{R}])", "client auth failures")], "ops")
endrow()
row("Routing and prepared statements")
panel("Routing split (decisions / s by outcome)",
      [(f"sum by (outcome) (rate(pgtide_routing_decisions_total{F}[{R}]))", "{{outcome}}"),
       (f"sum(rate(pgtide_routing_read_your_writes_total{F}[{R}]))", "reads held back (read your writes)")], "ops", w=12,
      desc="primary: may write; replica: a read on a replica; fallback: a read on the primary for want of a usable replica; "
           "hint: routed by a pgtide: comment or setting; retried_primary: refused by a replica (25006), run again on the primary.")
panel("Prepared statements / s",
      [(f"sum by (event) (rate(pgtide_prepared_statements_total{F}[{R}]))", "{{event}}")], "ops", w=12)
endrow()
row("Hosts")
panel("Host up", [(f"pgtide_host_up{F}", "{{database}} {{host}}")], kind="stat",
      desc="1: the health monitor considers the host usable (circuit breaker closed).")
panel("Host role", [(f"pgtide_host_role{F} == 1", "{{database}} {{host}}: {{role}}")], kind="stat")
panel("Circuit breaker", [(f"pgtide_host_health{F} == 1", "{{database}} {{host}}: {{state}}")], kind="stat")
endrow()
panel("Replica replay lag (bytes)", [(f"pgtide_host_replay_lag_bytes{F}", "{{database}} {{host}}")], "bytes", w=12)
panel("Replica replay lag (seconds)", [(f"pgtide_host_replay_lag_seconds{F}", "{{database}} {{host}}")], "s", w=12)
endrow()
panel("pgtide version", [("pgtide_build_info", "{{version}}")], kind="stat", w=6, h=4)

dash = {
    "title": "pgtide",
    "uid": "pgtide",
    "description": "pgtide connection pooler: throughput, latency, waiting, pools, routing, hosts",
    "tags": ["pgtide", "postgresql"],
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "time": {"from": "now-1h", "to": "now"},
    "refresh": "30s",
    "timezone": "",
    "annotations": {"list": []},
    "templating": {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "options": []},
        {"name": "database", "label": "database", "type": "query", "datasource": DS,
         "query": {"query": "label_values(pgtide_transactions_total, database)", "refId": "database"},
         "definition": "label_values(pgtide_transactions_total, database)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "options": [], "hide": 0},
    ]},
    "panels": panels,
}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pgtide.json")
with open(OUT, "w") as f:
    json.dump(dash, f, indent=2)
    f.write("\n")
print(f"{OUT}: {len(panels)} panels")
