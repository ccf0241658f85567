//! The checks: every ID defined once, every reference to a defined ID, every MUST covered.

use std::collections::BTreeMap;

use crate::refs::Reference;
use crate::spec::Requirement;

/// One line of the coverage table.
#[derive(Debug, PartialEq, Eq)]
pub struct Row<'a> {
    pub req: &'a Requirement,
    pub covering: Vec<&'a Reference>,
}

#[derive(Debug, Default)]
pub struct Report<'a> {
    pub rows: Vec<Row<'a>>,
    pub problems: Vec<String>,
}

impl Report<'_> {
    pub fn uncovered_musts(&self) -> impl Iterator<Item = &Row<'_>> {
        self.rows
            .iter()
            .filter(|r| r.req.keyword.is_mandatory() && r.covering.is_empty())
    }
}

/// Rows in spec order (file order, then line order, as given).
pub fn check<'a>(reqs: &'a [Requirement], refs: &'a [Reference]) -> Report<'a> {
    let mut problems = Vec::new();
    let mut first: BTreeMap<&str, &Requirement> = BTreeMap::new();
    for r in reqs {
        if let Some(earlier) = first.get(r.id.as_str()) {
            problems.push(format!(
                "{}: {} is defined twice (first at {})",
                r.at, r.id, earlier.at
            ));
        } else {
            first.insert(&r.id, r);
        }
    }
    let mut covering: BTreeMap<&str, Vec<&Reference>> = BTreeMap::new();
    for reference in refs {
        if first.contains_key(reference.id.as_str()) {
            covering.entry(&reference.id).or_default().push(reference);
        } else {
            problems.push(format!(
                "{}: {} is referenced by {} but defined in no spec",
                reference.at, reference.id, reference.by
            ));
        }
    }
    let rows: Vec<Row<'_>> = reqs
        .iter()
        .filter(|r| std::ptr::eq(*r, first[r.id.as_str()]))
        .map(|req| Row {
            req,
            covering: covering.remove(req.id.as_str()).unwrap_or_default(),
        })
        .collect();
    for row in &rows {
        if row.req.keyword.is_mandatory() && row.covering.is_empty() {
            problems.push(format!(
                "{}: {} is a {} without a covering test or scenario",
                row.req.at, row.req.id, row.req.keyword
            ));
        }
    }
    Report { rows, problems }
}

/// The coverage table: ID, marker, keyword, how many tests or scenarios cover it, the first.
pub fn table(rows: &[Row<'_>]) -> String {
    let header = ["ID", "MARKER", "KEYWORD", "TESTS", "FIRST"].map(String::from);
    let mut lines = vec![header];
    for row in rows {
        let tests = distinct_tests(&row.covering);
        lines.push([
            row.req.id.clone(),
            row.req.marker.to_string(),
            row.req.keyword.to_string(),
            tests.to_string(),
            row.covering
                .first()
                .map_or_else(|| "-".to_string(), |r| format!("{} ({})", r.by, r.at)),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        let mut cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        if let Some(last) = cells.last_mut() {
            *last = last.trim_end().to_string();
        }
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A test naming an ID twice (two `covers:` lines) still counts once.
fn distinct_tests(refs: &[&Reference]) -> usize {
    let mut by: Vec<&str> = refs.iter().map(|r| r.by.as_str()).collect();
    by.sort_unstable();
    by.dedup();
    by.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refs::scan_rust;
    use crate::spec::parse_spec;

    fn specs(text: &str) -> Vec<Requirement> {
        let (reqs, errors) = parse_spec("10-a.md", text);
        assert!(errors.is_empty(), "{errors:?}");
        reqs
    }

    fn rust(text: &str) -> Vec<Reference> {
        let (refs, errors) = scan_rust("t.rs", text);
        assert!(errors.is_empty(), "{errors:?}");
        refs
    }

    #[test]
    fn covered_musts_and_uncovered_shoulds_and_mays_pass() {
        let reqs = specs(
            &[
                "- **ORCH-2101** [BOTH] The queue MUST be bounded.",
                "- **ORCH-2102** [HOME] It SHOULD be fast.",
                "- **ORCH-2103** [CLOUD] Clients MAY retry.",
                "- **ORCH-2104** [BOTH] It MUST NOT hang.",
            ]
            .join("\n"),
        );
        let refs = rust(
            &[
                "// covers: ORCH-2101, ORCH-2104",
                "#[test]",
                "fn a() {}",
                "// covers: ORCH-2101",
                "#[test]",
                "fn b() {}",
            ]
            .join("\n"),
        );
        let report = check(&reqs, &refs);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let counts: Vec<(&str, usize)> = report
            .rows
            .iter()
            .map(|r| (r.req.id.as_str(), r.covering.len()))
            .collect();
        assert_eq!(
            counts,
            [
                ("ORCH-2101", 2),
                ("ORCH-2102", 0),
                ("ORCH-2103", 0),
                ("ORCH-2104", 1)
            ]
        );
        assert_eq!(report.uncovered_musts().count(), 0);
    }

    #[test]
    fn an_uncovered_must_or_must_not_is_a_problem() {
        let reqs = specs(
            &[
                "- **ORCH-2101** [BOTH] The queue MUST be bounded.",
                "- **ORCH-2104** [BOTH] It MUST NOT hang.",
            ]
            .join("\n"),
        );
        let report = check(&reqs, &[]);
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
        assert!(report.problems[0].contains("ORCH-2101 is a MUST without"));
        assert!(report.problems[1].contains("ORCH-2104 is a MUST NOT without"));
        let uncovered: Vec<&str> = report
            .uncovered_musts()
            .map(|r| r.req.id.as_str())
            .collect();
        assert_eq!(uncovered, ["ORCH-2101", "ORCH-2104"]);
    }

    #[test]
    fn a_reference_to_an_undefined_id_is_a_problem() {
        let reqs = specs("- **ORCH-2101** [BOTH] It MAY be.");
        let refs = rust("// covers: ORCH-2101, ORCH-2199\n#[test]\nfn a() {}");
        let report = check(&reqs, &refs);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.problems[0].starts_with("t.rs:1: ORCH-2199 is referenced by t::a"));
        assert_eq!(report.rows[0].covering.len(), 1);
    }

    #[test]
    fn an_id_defined_twice_is_a_problem_even_across_files() {
        let mut reqs = specs("- **ORCH-2101** [BOTH] It MAY be.");
        let (other, _) = parse_spec("11-b.md", "\n- **ORCH-2101** [HOME] It MAY be again.");
        reqs.extend(other);
        let report = check(&reqs, &[]);
        assert_eq!(
            report.problems,
            ["11-b.md:2: ORCH-2101 is defined twice (first at 10-a.md:1)"]
        );
        assert_eq!(report.rows.len(), 1);
    }

    #[test]
    fn the_table_lists_marker_keyword_count_and_first_location() {
        let reqs = specs(
            &[
                "- **ORCH-2101** [BOTH] It MUST be.",
                "- **OAI-7101** [HOME] It SHOULD be.",
            ]
            .join("\n"),
        );
        let refs = rust(
            &[
                "// covers: ORCH-2101",
                "// covers: ORCH-2101",
                "#[test]",
                "fn a() {}",
            ]
            .join("\n"),
        );
        let report = check(&reqs, &refs);
        let table = table(&report.rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("ID         MARKER  KEYWORD  TESTS  FIRST"),
            "{table}"
        );
        assert_eq!(lines[1], "ORCH-2101  BOTH    MUST     1      t::a (t.rs:1)");
        assert_eq!(lines[2], "OAI-7101   HOME    SHOULD   0      -");
    }
}
