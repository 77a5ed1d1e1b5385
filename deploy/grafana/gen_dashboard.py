#!/usr/bin/env python3
"""gen_dashboard.py: writes tvilling.json, the Grafana dashboard (python3 gen_dashboard.py > tvilling.json).
Edit the panels here, not in the JSON."""
import json
sel = 'site=~"$site",group=~"$group"'
panels = []
def ts(title, exprs, unit, x, y, w=12, h=8, desc=""):
    panels.append({
        "type": "timeseries", "title": title, "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l} for i, (e, l) in enumerate(exprs)],
    })
def stat(title, expr, legend, unit, x, y, w=6, h=4, desc="", mappings=None):
    panels.append({
        "type": "stat", "title": title, "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or []}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "textMode": "value_and_name"},
        "targets": [{"refId": "A", "expr": expr, "legendFormat": legend}],
    })
def row(title, y):
    panels.append({"type": "row", "title": title, "collapsed": False,
                   "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})

row("Replication", 0)
stat("Role", f'tvilling_group_role{{{sel}}} == 1', "{{site}} {{group}}: {{role}}", "none", 0, 1,
     desc="This agent's role per group.")
stat("Epoch", f'tvilling_group_epoch{{{sel}}}', "{{site}} {{group}}", "none", 6, 1,
     desc="Epoch (term of primaryship); it changes on every switchover or fail-over.")
stat("Links up", f'tvilling_peer_up{{{sel}}}', "{{site}} ↔ {{peer}}", "none", 12, 1,
     mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "up", "color": "green"}}}],
     desc="1 while a stream to or from the peer is established (streaming or copying).")
stat("Consistent", f'tvilling_group_consistent{{{sel}}}', "{{site}} {{group}}", "none", 18, 1,
     mappings=[{"type": "value", "options": {"0": {"text": "INCONSISTENT", "color": "red"}, "1": {"text": "consistent", "color": "green"}}}],
     desc="A replica that is not a prefix of the primary (full copy running) cannot be promoted.")
ts("Lag (age of the oldest record not durable at the peer)", [(f'tvilling_peer_lag_seconds{{{sel}}}', "{{site}} → {{peer}} ({{group}})")], "s", 0, 5,
   desc="What losing the primary site would lose, per peer, in time. The RPO alert fires above the target.")
ts("Lag (bytes not durable at the peer)", [(f'tvilling_peer_lag_bytes{{{sel}}}', "{{site}} → {{peer}} ({{group}})")], "bytes", 12, 5)
ts("RPO bound (min over peers)", [(f'tvilling_group_rpo_bound_seconds{{{sel}}}', "{{site}} {{group}} s"),
                                  (f'tvilling_group_rpo_bound_records{{{sel}}}', "{{site}} {{group}} records")], "s", 0, 13,
   desc="What a fail-over to the most current peer would lose now.")
ts("LSNs", [(f'tvilling_group_last_lsn{{{sel}}}', "{{site}} {{group}} last"),
            (f'tvilling_group_durable_lsn{{{sel}}}', "{{site}} {{group}} durable"),
            (f'tvilling_group_applied_lsn{{{sel}}}', "{{site}} {{group}} applied"),
            (f'tvilling_peer_durable_lsn{{{sel}}}', "{{site}} → {{peer}} durable")], "none", 12, 13)
ts("Round-trip time", [(f'tvilling_peer_rtt_seconds{{{sel}}}', "{{site}} → {{peer}}")], "s", 0, 21, w=8)
ts("Window and in flight", [(f'tvilling_peer_window_bytes{{{sel}}}', "{{site}} → {{peer}} window"),
                            (f'tvilling_peer_inflight_bytes{{{sel}}}', "{{site}} → {{peer}} in flight")], "bytes", 8, 21, w=8)
ts("Full copy progress", [(f'tvilling_peer_copy_done_bytes{{{sel}}} / (tvilling_peer_copy_total_bytes{{{sel}}} > 0)', "{{site}} → {{peer}}")], "percentunit", 16, 21, w=8)
row("Client I/O", 29)
ts("Client I/O latency p99", [(f'histogram_quantile(0.99, sum by (site, group, volume, op, le) (rate(tvilling_client_io_duration_seconds_bucket{{{sel}}}[$__rate_interval])))', "{{site}} {{volume}} {{op}}")], "s", 0, 30, w=8)
ts("Client requests/s", [(f'sum by (site, volume, op) (rate(tvilling_client_io_duration_seconds_count{{{sel}}}[$__rate_interval]))', "{{site}} {{volume}} {{op}}")], "reqps", 8, 30, w=8)
ts("Client throughput", [(f'sum by (site, volume, op) (rate(tvilling_client_io_bytes_total{{{sel}}}[$__rate_interval]))', "{{site}} {{volume}} {{op}}")], "Bps", 16, 30, w=8)
ts("Errors/s", [(f'sum by (site, volume, op, code) (rate(tvilling_client_io_errors_total{{{sel}}}[$__rate_interval]))', "{{site}} {{volume}} {{op}} {{code}}"),
                ('sum by (site) (rate(tvilling_nbd_request_errors_total{site=~"$site"}[$__rate_interval]))', "{{site}} NBD request errors"),
                ('sum by (site) (rate(tvilling_nbd_handshakes_refused_total{site=~"$site"}[$__rate_interval]))', "{{site}} NBD handshakes refused")], "reqps", 0, 38)
ts("NBD connections", [('tvilling_nbd_connections_open{site=~"$site"}', "{{site}}")], "none", 12, 38)
row("Log", 46)
ts("Log fsync latency", [(f'histogram_quantile(0.5, sum by (site, group, le) (rate(tvilling_log_fsync_duration_seconds_bucket{{{sel}}}[$__rate_interval])))', "{{site}} {{group}} p50"),
                         (f'histogram_quantile(0.99, sum by (site, group, le) (rate(tvilling_log_fsync_duration_seconds_bucket{{{sel}}}[$__rate_interval])))', "{{site}} {{group}} p99")], "s", 0, 47, w=8)
ts("Log size and hard cap", [(f'tvilling_log_bytes{{{sel}}}', "{{site}} {{group}} size"),
                             (f'tvilling_log_hard_cap_bytes{{{sel}}} > 0', "{{site}} {{group}} hard cap")], "bytes", 8, 47, w=8)
ts("Retained records", [(f'tvilling_log_retained_records{{{sel}}}', "{{site}} {{group}}")], "none", 16, 47, w=8)
ts("Log write throughput", [(f'rate(tvilling_log_appended_bytes_total{{{sel}}}[$__rate_interval])', "{{site}} {{group}}")], "Bps", 0, 55,
   desc="Bytes written to the group log: on a primary what clients write, on a replica what it receives from the primary.")
ts("Mean log batch", [(f'rate(tvilling_log_appended_records_total{{{sel}}}[$__rate_interval]) / rate(tvilling_log_commits_total{{{sel}}}[$__rate_interval])', "{{site}} {{group}}")], "none", 12, 55,
   desc="Records per log commit (one RocksDB write, at most one fsync).")

row("Links (primary side)", 63)
ts("Sent to peers", [(f'rate(tvilling_peer_sent_wire_bytes_total{{{sel}}}[$__rate_interval])', "{{site}} → {{peer}} on the wire"),
                     (f'rate(tvilling_peer_sent_log_bytes_total{{{sel}}}[$__rate_interval])', "{{site}} → {{peer}} log bytes"),
                     (f'tvilling_peer_rate_limit_bytes_per_second{{{sel}}} > 0', "{{site}} → {{peer}} rate cap")], "Bps", 0, 64, w=8,
   desc="Batches as sent (after compression) and the records they carry, against the link's rate cap (reloadable).")
ts("Compression ratio", [(f'rate(tvilling_peer_sent_log_bytes_total{{{sel}}}[$__rate_interval]) / rate(tvilling_peer_sent_wire_bytes_total{{{sel}}}[$__rate_interval])', "{{site}} → {{peer}}")], "none", 8, 64, w=8,
   desc="Log bytes per wire byte; 1 when the data does not compress (batches that do not shrink go uncompressed).")
ts("Stream churn", [(f'increase(tvilling_peer_disconnects_total{{{sel}}}[$__rate_interval])', "{{site}} → {{peer}} disconnects"),
                    (f'rate(tvilling_peer_sent_records_total{{{sel}}}[$__rate_interval]) / rate(tvilling_peer_sent_batches_total{{{sel}}}[$__rate_interval])', "{{site}} → {{peer}} records per batch")], "none", 16, 64, w=8,
   desc="Streams that ended (a flapping link) and the mean batch size.")

def var(name, label, query):
    return {"name": name, "label": label, "type": "query", "refresh": 2, "includeAll": True, "multi": True,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "definition": query, "query": {"query": query, "refId": name},
            "current": {"selected": True, "text": "All", "value": "$__all"}}
dash = {
    "title": "tvilling", "uid": "tvilling-overview", "tags": ["tvilling", "replication"],
    "description": "tvilling agents: replication lag and RPO, links, client I/O, the group log. Metrics: docs/operations.md.",
    "schemaVersion": 38, "version": 1, "editable": True, "time": {"from": "now-1h", "to": "now"},
    "refresh": "30s", "timezone": "utc",
    "templating": {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        var("site", "Site", "label_values(tvilling_agent_info, site)"),
        var("group", "Group", 'label_values(tvilling_group_epoch{site=~"$site"}, group)'),
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
print(json.dumps(dash, indent=2, ensure_ascii=False))
