//! Helpers of the operations checks: which names a PromQL expression uses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

/// PromQL functions, aggregations and keywords (the ones our artifacts use, and the common rest).
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "histogram_quantile",
    "abs",
    "absent",
    "absent_over_time",
    "clamp",
    "clamp_min",
    "clamp_max",
    "vector",
    "scalar",
    "time",
    "label_replace",
    "label_join",
    "avg_over_time",
    "max_over_time",
    "min_over_time",
    "sum_over_time",
    "count_over_time",
    "changes",
    "resets",
    "round",
    "ceil",
    "floor",
    "sort",
    "sort_desc",
    "inf",
    "nan",
    "e",
    "le",
];

/// Metric names an expression selects: identifiers outside label matchers, range selectors,
/// strings and grouping label lists (`by (…)`, `on (…)`, …), that are not PromQL words.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut cleaned = String::new();
    let (mut brace, mut bracket, mut quote) = (0, 0, false);
    for c in expr.chars() {
        match c {
            '"' => quote = !quote,
            '{' if !quote => brace += 1,
            '}' if !quote => brace -= 1,
            '[' if !quote => bracket += 1,
            ']' if !quote => bracket -= 1,
            _ if quote || brace > 0 || bracket > 0 => {}
            _ => cleaned.push(c),
        }
    }
    let cleaned = drop_grouping_lists(&cleaned);
    cleaned
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| !t.is_empty())
        .filter(|t| !PROMQL_WORDS.contains(t) && !t.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

/// Removes the parenthesised label list after `by`, `without`, `on`, `ignoring`,
/// `group_left` and `group_right`.
fn drop_grouping_lists(expr: &str) -> String {
    const KW: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let at_word_start =
            i == 0 || !(chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_');
        let kw = KW.iter().find(|k| {
            at_word_start
                && chars[i..].iter().collect::<String>().starts_with(*k)
                && chars
                    .get(i + k.len())
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
        });
        if let Some(k) = kw {
            let mut j = i + k.len();
            while chars.get(j).is_some_and(|c| c.is_whitespace()) {
                j += 1;
            }
            if chars.get(j) == Some(&'(') {
                while j < chars.len() && chars[j] != ')' {
                    j += 1;
                }
                out.push(' ');
                i = j + 1;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// Every metric family of both daemons in `ci/metrics.lint.json`, with histogram series names.
pub fn linted_series() -> BTreeSet<String> {
    let lint = llorch_test_support::metrics_lint();
    let mut out = BTreeSet::new();
    for daemon in ["orchestratord", "pool-managerd"] {
        for e in lint[daemon].as_array().unwrap() {
            let name = e["name"].as_str().unwrap();
            out.insert(name.to_string());
            if e["type"] == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_metric_names_and_skips_functions_labels_and_ranges() {
        let e = r#"histogram_quantile(0.95, sum by (le, pool_id) (rate(foo_bucket{job="x"}[5m]))) / on (pool_id) bar_total > 0.5 or vector(0)"#;
        let names: Vec<String> = metric_names(e).into_iter().collect();
        assert_eq!(names, vec!["bar_total", "foo_bucket"]);
        let e = r#"sum(rate(tasks_completed_total{outcome!~"end|CANCELLED"}[5m]))"#;
        assert_eq!(
            metric_names(e).into_iter().collect::<Vec<_>>(),
            vec!["tasks_completed_total"]
        );
        assert_eq!(metric_names("orchd_node_online == 0").len(), 1);
    }
}
