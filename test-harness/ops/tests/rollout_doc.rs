//! `docs/ROLLOUT.md` names only real signals: every metric it names is in
//! `ci/metrics.lint.json` (histogram series by their family), and it covers every alert rule of
//! `ci/alerts/cloud_profile.yml` and names no other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

fn repo_file(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Words of `text` made of `[a-z0-9_]`, starting with a letter.
fn snake_words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .filter(|w| w.contains('_') && w.starts_with(|c: char| c.is_ascii_lowercase()))
        .map(str::to_string)
        .collect()
}

/// The text inside backticks.
fn code_spans(text: &str) -> String {
    text.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect::<Vec<_>>()
        .join(" ")
}

// covers: OBS-6101
#[test]
fn the_rollout_guide_names_only_listed_metrics_and_every_alert_rule() {
    let doc = repo_file("docs/ROLLOUT.md");
    let lint: serde_json::Value = serde_json::from_str(&repo_file("ci/metrics.lint.json")).unwrap();
    let mut families = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for daemon in ["orchestratord", "pool-managerd"] {
        for m in lint[daemon].as_array().unwrap() {
            families.insert(m["name"].as_str().unwrap().to_string());
            for l in m["labels"].as_array().unwrap() {
                labels.insert(l.as_str().unwrap().to_string());
            }
            // Values of enum labels (`reason="pool_unavailable"`) are not metrics either.
            for values in m["values"].as_object().into_iter().flat_map(|v| v.values()) {
                for v in values.as_array().unwrap() {
                    labels.insert(v.as_str().unwrap().to_string());
                }
            }
        }
    }
    // A metric-like word: a family, or a histogram series of one. Label names and values,
    // settings and file names are not metrics.
    let prefixes = [
        "orchd_",
        "pool_",
        "tasks_",
        "tokens_",
        "queue_",
        "latency_",
        "admission_",
        "auth_",
    ];
    let spans = code_spans(&doc);
    let mut named = 0;
    for word in snake_words(&spans) {
        if !prefixes.iter().any(|p| word.starts_with(p)) || labels.contains(&word) {
            continue;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| word.strip_suffix(s))
            .filter(|f| families.contains(*f))
            .unwrap_or(&word);
        assert!(
            families.contains(family),
            "docs/ROLLOUT.md names `{word}`, which is not in ci/metrics.lint.json"
        );
        named += 1;
    }
    assert!(
        named >= 15,
        "only {named} metrics found: did the parsing break?"
    );

    let rules = repo_file("ci/alerts/cloud_profile.yml");
    let alerts: BTreeSet<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    for alert in &alerts {
        assert!(
            doc.contains(&format!("`{alert}`")),
            "docs/ROLLOUT.md does not say what `{alert}` means during a rollout"
        );
    }
    // Every CamelCase word in the alert table is a rule.
    let table = doc
        .split("| alert | severity |")
        .nth(1)
        .expect("the alert table")
        .split("\n\n")
        .next()
        .unwrap();
    for line in table.lines().skip(1) {
        let name = line.split('`').nth(1).unwrap_or_default();
        if !name.is_empty() {
            assert!(alerts.contains(name), "`{name}` is not an alert rule");
        }
    }
}
