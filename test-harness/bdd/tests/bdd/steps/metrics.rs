//! /metrics: counters sampled before an action and compared after it.

use cucumber::{given, then};
use llorch_test_support::metric_value;

use crate::world::Bdd;

/// `name{k="v",...}` as written in a step.
fn parse_sample(sample: &str) -> (String, Vec<(String, String)>) {
    let Some((name, labels)) = sample.split_once('{') else {
        return (sample.to_string(), Vec::new());
    };
    let labels = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().trim_matches('"').to_string())
        })
        .collect();
    (name.to_string(), labels)
}

/// The sum over every series of `name` carrying these labels (others may differ).
fn value(text: &str, sample: &str) -> f64 {
    let (name, labels) = parse_sample(sample);
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| wanted.iter().all(|w| l.contains(w.as_str())))
        .collect();
    // One series per label set: a name with labels left out sums its series.
    series
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[given("the metrics are sampled")]
async fn sample(w: &mut Bdd) {
    w.metrics_before = Some(w.metrics().await);
}

fn rise(w: &Bdd, after: &str, sample: &str) -> f64 {
    let before = w
        .metrics_before
        .as_deref()
        .expect("no sample before: add 'Given the metrics are sampled'");
    value(after, sample) - value(before, sample)
}

#[then(expr = "the metric {string} rose by {int}")]
async fn rose_by(w: &mut Bdd, sample: String, by: u32) {
    let after = w.metrics().await;
    assert_eq!(
        rise(w, &after, &sample),
        f64::from(by),
        "{sample}; the scrape:\n{after}"
    );
    // The family is really there, not a sum over nothing.
    let (name, labels) = parse_sample(&sample);
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert!(
        metric_value(&after, &name, &labels).is_some(),
        "{sample} not exposed"
    );
}

#[then("every metric family orchestratord exposes is in the lint list with its type and labels")]
async fn lint_clean(w: &mut Bdd) {
    let text = w.metrics().await;
    // Families not exposed yet (no sample so far) are the lint list's business, not this one's.
    let problems: Vec<String> = llorch_test_support::lint_scrape("orchestratord", &text, "home")
        .into_iter()
        .filter(|p| !p.ends_with("is listed but not exposed"))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
}

#[then(expr = "the metric {string} rose by the tokens of task {string}")]
async fn rose_by_tokens(w: &mut Bdd, sample: String, name: String) {
    let s = w.status(&w.task_id(&name)).await;
    let tokens = s["tokens_out"].as_f64().unwrap();
    assert!(tokens >= 1.0, "{s}");
    let after = w.metrics().await;
    assert_eq!(
        rise(w, &after, &sample),
        tokens,
        "{sample}; the scrape:\n{after}"
    );
}
