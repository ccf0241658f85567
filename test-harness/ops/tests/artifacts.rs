//! The dashboard and the alert rules: valid, tested with promtool, naming only linted metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use llorch_ops_tests::{linted_series, metric_names};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn promtool(args: &[&str], dir: &std::path::Path) -> String {
    let out = std::process::Command::new("promtool")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("promtool not found: `make test` installs Debian's prometheus package");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

// covers: OBS-6102
#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = root().join("ci/alerts");
    let check = promtool(&["check", "rules", "cloud_profile.yml"], &dir);
    assert!(check.contains("SUCCESS: 6 rules found"), "{check}");
    promtool(&["test", "rules", "cloud_profile.test.yml"], &dir);
}

// covers: OBS-6101
#[test]
fn alert_rules_name_only_linted_metrics_and_have_runbooks() {
    let text = std::fs::read_to_string(root().join("ci/alerts/cloud_profile.yml")).unwrap();
    let known = linted_series();
    let runbooks =
        std::fs::read_to_string(root().join("docs/runbooks/CLOUD_PROFILE_INCIDENTS.md")).unwrap();
    let mut alerts = 0;
    for line in text.lines() {
        let line = line.trim();
        if let Some(expr) = line.strip_prefix("expr: ") {
            for name in metric_names(expr) {
                assert!(
                    known.contains(&name),
                    "alert rule uses {name}, not in ci/metrics.lint.json"
                );
            }
        }
        if line.starts_with("- alert: ") {
            alerts += 1;
        }
        if let Some(link) = line.strip_prefix("runbook: ") {
            let anchor = link.split('#').nth(1).unwrap();
            let heading = runbooks.lines().any(|l| {
                l.starts_with("## ")
                    && l[3..]
                        .to_lowercase()
                        .replace(['/', ','], "")
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join("-")
                        == anchor
            });
            assert!(heading, "runbook anchor #{anchor} has no heading");
        }
    }
    assert_eq!(alerts, 6);
}

// covers: OBS-6101
#[test]
fn dashboard_is_valid_json_with_the_planned_panels_and_linted_metrics_only() {
    let text =
        std::fs::read_to_string(root().join("ci/dashboards/cloud_profile_overview.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is not valid JSON");
    let panels = dash["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Pool availability",
        "Health-check latency p50 / p95",
        "Handoff processing rate",
        "Task dispatch rate by pool",
        "Error rate",
        "Queue depth",
        "First-token latency p50 / p95",
        "Tokens/s",
    ] {
        assert!(titles.contains(&want), "missing panel {want:?}");
    }
    let known = linted_series();
    let mut exprs = 0;
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            exprs += 1;
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "panel {:?}: {expr} names no metric",
                p["title"]
            );
            for name in names {
                assert!(
                    known.contains(&name),
                    "panel {:?} uses {name}, not in ci/metrics.lint.json",
                    p["title"]
                );
            }
        }
    }
    assert!(exprs >= 16);
}
