//! `spec-trace`: reads the requirements of `.specs/*.md`, finds the tests (`// covers: ID` above
//! a Rust test) and BDD scenarios (`@ID` tags) that check them under `bin/`, `libs/` and
//! `test-harness/`, prints a coverage table, and fails when a MUST is not covered, an unknown
//! ID is referenced or an ID is defined twice. `make check-specs` runs it.

mod check;
mod refs;
mod spec;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: spec-trace [--root <workspace root>]";
/// Where references are looked for, relative to the root.
const SCAN_DIRS: [&str; 3] = ["bin", "libs", "test-harness"];

fn main() -> ExitCode {
    let root = match root_from_args(std::env::args().skip(1)) {
        Ok(root) => root,
        Err(msg) => {
            eprintln!("spec-trace: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&root) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(msg) => {
            eprintln!("spec-trace: {msg}");
            ExitCode::from(2)
        }
    }
}

fn root_from_args(mut args: impl Iterator<Item = String>) -> Result<PathBuf, String> {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    match (args.next().as_deref(), args.next(), args.next()) {
        (None, _, _) => Ok(default),
        (Some("--root"), Some(root), None) => Ok(PathBuf::from(root)),
        (Some("-h" | "--help"), None, _) => Err("traces .specs/ to tests".to_string()),
        _ => Err("unexpected arguments".to_string()),
    }
}

/// Prints the table and the problems; `Ok(true)` when there are none.
fn run(root: &Path) -> Result<bool, String> {
    let specs_dir = root.join(".specs");
    let mut spec_files = files_under(&specs_dir, &|p| has_ext(p, "md"))?;
    spec_files.sort();
    if spec_files.is_empty() {
        return Err(format!("no spec files in {}", specs_dir.display()));
    }
    let mut reqs = Vec::new();
    let mut problems = Vec::new();
    for path in &spec_files {
        let (found, errors) = spec::parse_spec(&relative(root, path), &read(path)?);
        reqs.extend(found);
        problems.extend(errors);
    }

    let mut sources = Vec::new();
    for dir in SCAN_DIRS {
        sources.extend(files_under(&root.join(dir), &|p| {
            has_ext(p, "rs") || has_ext(p, "feature")
        })?);
    }
    sources.sort();
    let mut references = Vec::new();
    for path in &sources {
        let name = relative(root, path);
        let text = read(path)?;
        if has_ext(path, "rs") {
            let (found, errors) = refs::scan_rust(&name, &text);
            references.extend(found);
            problems.extend(errors);
        } else {
            references.extend(refs::scan_feature(&name, &text));
        }
    }

    let report = check::check(&reqs, &references);
    print!("{}", check::table(&report.rows));
    problems.extend(report.problems.iter().cloned());
    let musts = report
        .rows
        .iter()
        .filter(|r| r.req.keyword.is_mandatory())
        .count();
    let uncovered: Vec<&str> = report
        .uncovered_musts()
        .map(|r| r.req.id.as_str())
        .collect();
    println!(
        "\n{} requirements in {} files, {} MUST/MUST NOT, {} uncovered; {} references in tests and scenarios",
        report.rows.len(),
        spec_files.len(),
        musts,
        uncovered.len(),
        references.len()
    );
    if !uncovered.is_empty() {
        println!("uncovered: {}", uncovered.join(" "));
    }
    for p in &problems {
        eprintln!("spec-trace: {p}");
    }
    Ok(problems.is_empty())
}

fn has_ext(path: &Path, ext: &str) -> bool {
    path.extension().is_some_and(|e| e == ext)
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Files under `dir` (recursively) that `keep` accepts; `target/` and hidden directories are
/// skipped, and a missing `dir` has none.
fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot list {}: {e}", dir.display())),
        };
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let kind = entry
                .file_type()
                .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
            if kind.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    stack.push(path);
                }
            } else if kind.is_file() && keep(&path) {
                out.push(path);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_defaults_to_the_workspace_and_can_be_given() {
        let none = root_from_args(std::iter::empty()).unwrap();
        assert!(none.join("test-harness/spec-trace/Cargo.toml").exists());
        let given = root_from_args(["--root".to_string(), "/x".to_string()].into_iter());
        assert_eq!(given, Ok(PathBuf::from("/x")));
        assert!(root_from_args(["--bogus".to_string()].into_iter()).is_err());
    }
}
