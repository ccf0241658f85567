//! Samples of a Prometheus text exposition (orchestratord's open `/metrics`), enough for
//! `llorch status`: names, labels and values; comments and timestamps are skipped.

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample line of `text`; a line that does not parse is skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(sample)
        .collect()
}

fn sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ', '\t'])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = label_set(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `k="v",…}` → the pairs and what follows the `}`.
fn label_set(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = s.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        s = &after[end + 2..];
    }
}

/// The sum of the samples named `name` whose labels pass `keep` (`None` when there is none).
pub fn sum(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name && keep(s))
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels_parse_and_comments_are_skipped() {
        let text = "# HELP queue_depth Tasks queued.\n# TYPE queue_depth gauge\nqueue_depth{priority=\"batch\"} 2\nqueue_depth{priority=\"interactive\"} 3\nauth_failures_total 7\ntokens_out_total{pool_id=\"p\\\"0\",x=\"a,b}\"} 1.5e3 1700000000\nbroken{ 1\n";
        let s = parse(text);
        assert_eq!(s.len(), 4, "{s:?}");
        assert_eq!(sum(&s, "queue_depth", |_| true), Some(5.0));
        assert_eq!(
            sum(&s, "queue_depth", |x| x.label("priority") == Some("batch")),
            Some(2.0)
        );
        assert_eq!(sum(&s, "auth_failures_total", |_| true), Some(7.0));
        assert_eq!(s[3].label("pool_id"), Some("p\"0"));
        assert_eq!(s[3].label("x"), Some("a,b}"));
        assert_eq!(s[3].value, 1500.0);
        assert_eq!(sum(&s, "absent", |_| true), None);
    }
}
