//! Requirements as `.specs/*.md` states them: one bullet each,
//! `- **ORCH-2101** [BOTH] Text with a MUST, SHOULD or MAY ...`.

use std::fmt;

/// Where a requirement applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    Home,
    Cloud,
    Both,
}

impl Marker {
    fn parse(s: &str) -> Option<Marker> {
        match s {
            "HOME" => Some(Marker::Home),
            "CLOUD" => Some(Marker::Cloud),
            "BOTH" => Some(Marker::Both),
            _ => None,
        }
    }
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Marker::Home => "HOME",
            Marker::Cloud => "CLOUD",
            Marker::Both => "BOTH",
        })
    }
}

/// The RFC 2119 keyword a requirement is stated with (the first one in its text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keyword {
    Must,
    MustNot,
    Should,
    ShouldNot,
    May,
}

impl Keyword {
    /// MUST and MUST NOT need a covering test.
    pub fn is_mandatory(self) -> bool {
        matches!(self, Keyword::Must | Keyword::MustNot)
    }

    fn find(text: &str) -> Option<Keyword> {
        let words: Vec<&str> = text
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
            .collect();
        for (i, w) in words.iter().enumerate() {
            let not_next = words.get(i + 1) == Some(&"NOT");
            match *w {
                "MUST" if not_next => return Some(Keyword::MustNot),
                "MUST" => return Some(Keyword::Must),
                "SHOULD" if not_next => return Some(Keyword::ShouldNot),
                "SHOULD" => return Some(Keyword::Should),
                "MAY" => return Some(Keyword::May),
                _ => {}
            }
        }
        None
    }
}

impl fmt::Display for Keyword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Keyword::Must => "MUST",
            Keyword::MustNot => "MUST NOT",
            Keyword::Should => "SHOULD",
            Keyword::ShouldNot => "SHOULD NOT",
            Keyword::May => "MAY",
        })
    }
}

/// A file and a 1-based line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub id: String,
    pub marker: Marker,
    pub keyword: Keyword,
    pub text: String,
    pub at: Location,
}

/// `PREFIX-1234`: upper-case letters (digits after the first allowed), a dash, digits.
pub fn is_id(s: &str) -> bool {
    let Some((prefix, number)) = s.split_once('-') else {
        return false;
    };
    let mut chars = prefix.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        && !number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit())
}

/// Parses one spec file. Fenced code blocks are skipped (examples of the format live there).
/// A bullet that starts like a requirement (`- **` and an ID-like word) but breaks the format is
/// an error, so a typo never silently drops a requirement.
pub fn parse_spec(file: &str, text: &str) -> (Vec<Requirement>, Vec<String>) {
    let mut reqs = Vec::new();
    let mut errors = Vec::new();
    let mut in_fence = false;
    for (n, line) in text.lines().enumerate() {
        let at = Location {
            file: file.to_string(),
            line: n + 1,
        };
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let Some(rest) = line.strip_prefix("- **") else {
            continue;
        };
        if !looks_like_id(rest) {
            continue;
        }
        match parse_bullet(rest) {
            Ok((id, marker, keyword, text)) => reqs.push(Requirement {
                id,
                marker,
                keyword,
                text,
                at,
            }),
            Err(why) => errors.push(format!("{at}: {why}")),
        }
    }
    (reqs, errors)
}

/// A bullet whose bold start has a dash and no space (`- **ORCH-2101**`, `- **orch-1**`) is
/// meant as a requirement; other bold bullets (`- **Marker**: ...`) are prose.
fn looks_like_id(rest: &str) -> bool {
    let bold = rest.split("**").next().unwrap_or_default();
    bold.contains('-') && !bold.contains(char::is_whitespace)
}

fn parse_bullet(rest: &str) -> Result<(String, Marker, Keyword, String), String> {
    let (id, rest) = rest
        .split_once("** ")
        .ok_or("a requirement bullet is `- **ID** [MARKER] text`")?;
    if !is_id(id) {
        return Err(format!("`{id}` is not an ID like ORCH-2101"));
    }
    let rest = rest
        .strip_prefix('[')
        .ok_or_else(|| format!("{id}: the marker [HOME], [CLOUD] or [BOTH] must follow the ID"))?;
    let (marker, text) = rest
        .split_once("] ")
        .ok_or_else(|| format!("{id}: the marker is not closed"))?;
    let marker = Marker::parse(marker)
        .ok_or_else(|| format!("{id}: marker `{marker}` is not HOME, CLOUD or BOTH"))?;
    let keyword =
        Keyword::find(text).ok_or_else(|| format!("{id}: no MUST, SHOULD or MAY in the text"))?;
    Ok((id.to_string(), marker, keyword, text.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bullet_gives_id_marker_keyword_and_line() {
        let text = "# Area\n\nIntro.\n\n- **ORCH-2101** [BOTH] The queue MUST be bounded.\n";
        let (reqs, errors) = parse_spec("10-a.md", text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(r.id, "ORCH-2101");
        assert_eq!(r.marker, Marker::Both);
        assert_eq!(r.keyword, Keyword::Must);
        assert_eq!(r.text, "The queue MUST be bounded.");
        assert_eq!(r.at.to_string(), "10-a.md:5");
    }

    #[test]
    fn the_first_keyword_counts_and_not_is_kept() {
        assert_eq!(
            Keyword::find("It MUST NOT leak; it MAY log."),
            Some(Keyword::MustNot)
        );
        assert_eq!(
            Keyword::find("It SHOULD wait, it MUST end."),
            Some(Keyword::Should)
        );
        assert_eq!(
            Keyword::find("It SHOULD NOT wait."),
            Some(Keyword::ShouldNot)
        );
        assert_eq!(Keyword::find("Clients MAY resume."), Some(Keyword::May));
        assert_eq!(Keyword::find("lower-case must does not count"), None);
        assert_eq!(
            Keyword::find("MUSTARD is not MUST-like"),
            Some(Keyword::Must)
        );
        assert_eq!(Keyword::find("MUSTARD only"), None);
    }

    #[test]
    fn malformed_bullets_are_errors_and_fenced_examples_are_skipped() {
        let text = [
            "```",
            "- **ORCH-9999** [BOTH] An example MUST not count.",
            "```",
            "- **orch-1** [BOTH] Bad id MUST fail.",
            "- **AUTH-5101** [EVERYWHERE] Bad marker MUST fail.",
            "- **AUTH-5102** [HOME] No keyword here.",
            "- **AUTH-5103**[HOME] Missing space MUST fail.",
            "- plain bullet, not a requirement",
            "- **Bold** start of a plain bullet MUST be prose",
            "- **Two words**: prose too",
            "- **ORCH-2104**: a colon MUST fail",
        ]
        .join("\n");
        let (reqs, errors) = parse_spec("x.md", &text);
        assert!(reqs.is_empty(), "{reqs:?}");
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(errors[0].starts_with("x.md:4:"), "{errors:?}");
        assert!(errors[1].contains("EVERYWHERE"), "{errors:?}");
        assert!(errors[2].contains("no MUST"), "{errors:?}");
    }

    #[test]
    fn ids_are_upper_case_prefix_dash_digits() {
        assert!(is_id("ORCH-2101"));
        assert!(is_id("OAI-7101"));
        assert!(is_id("E2E-1"));
        assert!(!is_id("orch-2101"));
        assert!(!is_id("ORCH-"));
        assert!(!is_id("ORCH2101"));
        assert!(!is_id("ORCH-21a"));
        assert!(!is_id("2E-1"));
    }
}
