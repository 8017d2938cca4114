//! The Grafana dashboard and the Prometheus alert rules in
//! `deploy/monitoring/` query only metrics the binaries export: every name
//! in their expressions is in `vtp_server::metrics::EXPORTED` or
//! `vtp_trainer::service::http::EXPORTED`, and every name in those lists is
//! recorded by the code (`tests/tier1_e2e.rs` scrapes them from the real
//! binaries after a training run).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn exported() -> BTreeSet<&'static str> {
    vtp_server::metrics::EXPORTED
        .into_iter()
        .chain(vtp_trainer::service::http::EXPORTED)
        .collect()
}

/// Every `expr` string in a JSON or YAML document.
fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => exprs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| exprs(item, out)),
        _ => {}
    }
}

/// The metric names an expression names: VTP's prefixes (`vtp_`,
/// `training_`, `active_`), a histogram's series as the histogram.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let starts_word =
            at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let rest = &expr[at..];
        if starts_word
            && ["vtp_", "training_", "active_"]
                .iter()
                .any(|prefix| rest.starts_with(prefix))
        {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            at += name.len();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| exported().contains(base))
                .map_or_else(|| name.clone(), str::to_owned);
            names.push(base);
        } else {
            at += 1;
        }
    }
    names
}

fn dashboard_exprs() -> Vec<String> {
    let path = repo().join("deploy/monitoring/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    exprs(&dashboard, &mut out);
    out
}

fn alert_exprs() -> Vec<String> {
    let path = repo().join("deploy/monitoring/alerts.yaml");
    let config_map: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rules: Value =
        serde_yaml_ng::from_str(config_map["data"]["vtp-alerts.yaml"].as_str().unwrap()).unwrap();
    let mut out = Vec::new();
    exprs(&rules, &mut out);
    out
}

#[test]
fn the_dashboard_and_the_alerts_query_only_exported_metrics() {
    let exported = exported();
    for (file, exprs) in [
        ("grafana-dashboard.json", dashboard_exprs()),
        ("alerts.yaml", alert_exprs()),
    ] {
        assert!(exprs.len() >= 5, "{file}: only {} expressions", exprs.len());
        for expr in &exprs {
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{file}: {expr:?} queries no VTP metric");
            for name in names {
                assert!(
                    exported.contains(name.as_str()),
                    "{file}: {expr:?} queries {name}, which no binary exports"
                );
            }
        }
    }
}

#[test]
fn the_dashboard_shows_the_seeds_metrics_and_the_alerts_cover_the_failures() {
    let dashboard: BTreeSet<String> = dashboard_exprs()
        .iter()
        .flat_map(|e| metric_names(e))
        .collect();
    for seed in [
        "training_jobs_total",
        "training_duration_seconds",
        "active_training_jobs",
    ] {
        assert!(
            dashboard.contains(seed),
            "the dashboard does not show {seed}"
        );
    }
    let alerts: BTreeSet<String> = alert_exprs().iter().flat_map(|e| metric_names(e)).collect();
    for watched in [
        "vtp_leases_expired_total",                     // a job without heartbeat
        "vtp_http_requests_total",                      // callback 5xx rate
        "vtp_trainer_outbox_depth",                     // outbox growing
        "vtp_trainer_start_time_seconds",               // trainer restarts
        "vtp_trainer_last_heartbeat_timestamp_seconds", // a silent trainer
    ] {
        assert!(alerts.contains(watched), "no alert watches {watched}");
    }
}

/// Every listed name is recorded somewhere in the code that lists it.
#[test]
fn every_exported_name_is_recorded_by_the_code() {
    fn sources(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    for (dir, names) in [
        ("crates/vtp-server/src", &vtp_server::metrics::EXPORTED[..]),
        (
            "crates/vtp-trainer/src/service",
            &vtp_trainer::service::http::EXPORTED[..],
        ),
    ] {
        let mut code = String::new();
        sources(&repo().join(dir), &mut code);
        for name in names {
            let recorded = ["counter", "gauge", "histogram"]
                .iter()
                .any(|kind| code.contains(&format!("metrics::{kind}!(\"{name}\"")));
            assert!(recorded, "{name} is listed but never recorded in {dir}");
        }
    }
}

#[test]
fn names_are_read_from_expressions() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.9, sum by (le) (rate(training_duration_seconds_bucket[5m])))"
        ),
        ["training_duration_seconds"]
    );
    assert_eq!(
        metric_names(
            "time() - vtp_trainer_last_heartbeat_timestamp_seconds and on (instance) vtp_trainer_jobs > 0"
        ),
        [
            "vtp_trainer_last_heartbeat_timestamp_seconds",
            "vtp_trainer_jobs"
        ]
    );
    assert_eq!(
        metric_names("rate(vtpx_requests[5m]) + my_vtp_thing"),
        Vec::<String>::new()
    );
}
