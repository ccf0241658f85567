//! References from tests to requirements: in Rust test code a comment line
//! `// covers: ORCH-2101, AUTH-5103` directly above a test's attribute; in Gherkin feature files a
//! tag `@ORCH-2101` on a scenario (or on a feature: one reference named after the feature, which
//! covers the requirement through all its scenarios).

use crate::spec::{is_id, Location};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub id: String,
    /// The test (`path::function`) or scenario (`path: title`) that covers it.
    pub by: String,
    pub at: Location,
}

const COVERS: &str = "// covers:";
/// How far below a `covers:` line the test's `fn` may be (comments and attributes between).
const LOOKAHEAD: usize = 12;

/// Parses the `covers:` comments of one Rust file. A `covers:` comment that is not above a test
/// function, or that names something other than IDs, is an error.
pub fn scan_rust(file: &str, text: &str) -> (Vec<Reference>, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut refs = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(list) = line.trim_start().strip_prefix(COVERS) else {
            continue;
        };
        let at = Location {
            file: file.to_string(),
            line: n + 1,
        };
        let ids: Vec<&str> = list
            .split([',', ' ', '\t'])
            .filter(|s| !s.is_empty())
            .collect();
        if ids.is_empty() {
            errors.push(format!("{at}: `covers:` names no requirement"));
            continue;
        }
        if let Some(bad) = ids.iter().find(|s| !is_id(s)) {
            errors.push(format!("{at}: `{bad}` is not a requirement ID"));
            continue;
        }
        let Some(name) = test_below(&lines[n + 1..]) else {
            errors.push(format!(
                "{at}: `covers:` must stand directly above a test's #[test] attribute"
            ));
            continue;
        };
        for id in ids {
            refs.push(Reference {
                id: id.to_string(),
                by: format!("{}::{}", module_path(file), name),
                at: at.clone(),
            });
        }
    }
    (refs, errors)
}

/// The name of the test function below, if the lines down to its `fn` are only comments and
/// attributes (one of them a test attribute, possibly spanning lines).
fn test_below(lines: &[&str]) -> Option<String> {
    let mut is_test = false;
    let mut in_attribute = false;
    for line in lines.iter().take(LOOKAHEAD) {
        let t = line.trim();
        if let Some(rest) = fn_rest(t) {
            if !is_test {
                return None;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            return (!name.is_empty()).then_some(name);
        }
        if let Some(attr) = t.strip_prefix("#[") {
            is_test |= attr.starts_with("test") || attr.contains("::test");
            in_attribute = !t.ends_with(']');
        } else if t.starts_with("//") || in_attribute {
            in_attribute &= !t.ends_with(']');
        } else {
            return None;
        }
    }
    None
}

fn fn_rest(t: &str) -> Option<&str> {
    let t = t.strip_prefix("pub ").unwrap_or(t);
    let t = t.strip_prefix("async ").unwrap_or(t);
    t.strip_prefix("fn ")
}

/// `bin/orchestratord/tests/it/admission.rs` → `bin/orchestratord/tests/it/admission`.
fn module_path(file: &str) -> &str {
    file.strip_suffix(".rs").unwrap_or(file)
}

const SCENARIO_KEYWORDS: [&str; 6] = [
    "Feature:",
    "Rule:",
    "Scenario:",
    "Scenario Outline:",
    "Scenario Template:",
    "Example:",
];

/// An outline's example tables: tags on them belong to the outline above.
const EXAMPLE_KEYWORDS: [&str; 2] = ["Examples:", "Scenarios:"];

/// Parses the `@ID` tags of one feature file. Tags that are not shaped like an ID (`@serial`,
/// `@cloud`) are left alone; an ID-shaped tag is a reference.
pub fn scan_feature(file: &str, text: &str) -> Vec<Reference> {
    let mut refs = Vec::new();
    let mut pending: Vec<(String, Location)> = Vec::new();
    // The title of the feature, rule or scenario read last.
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('@') {
            for tag in t.split_whitespace() {
                if tag.starts_with('#') {
                    break;
                }
                if let Some(id) = tag.strip_prefix('@').filter(|id| is_id(id)) {
                    pending.push((
                        id.to_string(),
                        Location {
                            file: file.to_string(),
                            line: n + 1,
                        },
                    ));
                }
            }
            continue;
        }
        let title = match SCENARIO_KEYWORDS.iter().find_map(|k| t.strip_prefix(k)) {
            Some(title) => {
                current = title.trim().to_string();
                Some(current.as_str())
            }
            None if EXAMPLE_KEYWORDS.iter().any(|k| t.starts_with(k)) => Some(current.as_str()),
            None => None,
        };
        if let Some(title) = title {
            for (id, at) in pending.drain(..) {
                refs.push(Reference {
                    id,
                    by: format!("{file}: {title}"),
                    at,
                });
            }
        }
    }
    refs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_covers_line_above_a_test_names_the_test() {
        let text = [
            "mod tests {",
            "    // covers: ORCH-2101, AUTH-5103",
            "    #[tokio::test(start_paused = true)]",
            "    async fn queue_full_is_429() {}",
            "",
            "    // Why this test exists.",
            "    // covers: OBS-6101",
            "    /// Doc line.",
            "    #[test]",
            "    #[cfg(unix)]",
            "    fn metrics_are_listed() {}",
            "}",
        ]
        .join("\n");
        let (refs, errors) = scan_rust("bin/x/tests/it/a.rs", &text);
        assert!(errors.is_empty(), "{errors:?}");
        let got: Vec<(&str, &str, usize)> = refs
            .iter()
            .map(|r| (r.id.as_str(), r.by.as_str(), r.at.line))
            .collect();
        assert_eq!(
            got,
            [
                ("ORCH-2101", "bin/x/tests/it/a::queue_full_is_429", 2),
                ("AUTH-5103", "bin/x/tests/it/a::queue_full_is_429", 2),
                ("OBS-6101", "bin/x/tests/it/a::metrics_are_listed", 7),
            ]
        );
    }

    #[test]
    fn a_multi_line_test_attribute_is_followed_to_its_fn() {
        let text = [
            "// covers: POOL-3101",
            "#[tokio::test(",
            "    flavor = \"multi_thread\",",
            ")]",
            "async fn spans_lines() {}",
        ]
        .join("\n");
        let (refs, errors) = scan_rust("a.rs", &text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].by, "a::spans_lines");
    }

    #[test]
    fn covers_outside_test_code_or_with_bad_ids_is_an_error() {
        let text = [
            "// covers: ORCH-2101",
            "fn not_a_test() {}",
            "// covers: ORCH-2102",
            "let x = 1;",
            "// covers: orch-2103",
            "#[test]",
            "fn lower_case_id() {}",
            "// covers:",
            "#[test]",
            "fn nothing_named() {}",
            "let s = \"// covers: ORCH-1 is inside a string\";",
        ]
        .join("\n");
        let (refs, errors) = scan_rust("a.rs", &text);
        assert!(refs.is_empty(), "{refs:?}");
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("a.rs:1:"), "{errors:?}");
        assert!(errors[1].starts_with("a.rs:3:"), "{errors:?}");
        assert!(errors[2].contains("orch-2103"), "{errors:?}");
        assert!(errors[3].contains("names no requirement"), "{errors:?}");
    }

    #[test]
    fn tags_on_an_example_table_belong_to_the_outline_above() {
        let text = [
            "Feature: Queue",
            "  Scenario Outline: priorities",
            "    When <p>",
            "    @ORCH-2107",
            "    Examples: interactive",
            "      | p |",
            "  @ORCH-2105",
            "  Scenario: full",
        ]
        .join("\n");
        let refs = scan_feature("f.feature", &text);
        let got: Vec<(&str, &str)> = refs
            .iter()
            .map(|r| (r.id.as_str(), r.by.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("ORCH-2107", "f.feature: priorities"),
                ("ORCH-2105", "f.feature: full")
            ]
        );
    }

    #[test]
    fn feature_tags_cover_the_scenario_below_and_other_tags_are_ignored() {
        let text = [
            "@AUTH-5101",
            "Feature: Authentication",
            "",
            "  @ORCH-2101 @serial @ORCH-2102",
            "  Scenario: a full queue rejects",
            "    Given a queue",
            "",
            "  @cloud",
            "  Scenario Outline: untagged",
            "",
            "  @ORCH-2301 # a comment @ORCH-9999",
            "  Scenario: replay",
        ]
        .join("\n");
        let refs = scan_feature("test-harness/bdd/features/a.feature", &text);
        let got: Vec<(&str, &str, usize)> = refs
            .iter()
            .map(|r| (r.id.as_str(), r.by.as_str(), r.at.line))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "AUTH-5101",
                    "test-harness/bdd/features/a.feature: Authentication",
                    1
                ),
                (
                    "ORCH-2101",
                    "test-harness/bdd/features/a.feature: a full queue rejects",
                    4
                ),
                (
                    "ORCH-2102",
                    "test-harness/bdd/features/a.feature: a full queue rejects",
                    4
                ),
                (
                    "ORCH-2301",
                    "test-harness/bdd/features/a.feature: replay",
                    11
                ),
            ]
        );
    }
}
