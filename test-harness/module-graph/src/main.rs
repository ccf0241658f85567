//! The module graph of the daemon crates, read from their sources: which top-level module of a
//! crate names which other (`crate::x`, in a `use` or a path; `super::` from a nested module
//! stays inside its top module). Test code (`src/tests/`, and a file's `#[cfg(test)] mod tests`)
//! is left out: tests may reach anywhere. Prints each crate's graph, layer by layer, and exits 1
//! when modules depend on each other in a cycle, naming the cycle and where each of its edges is
//! written.
//!
//! `cargo run -p module-graph [crate-src-dir ...]` (default: both daemons).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

mod graph;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    let crates: Vec<PathBuf> = if args.is_empty() {
        ["bin/orchestratord/src", "bin/pool-managerd/src"]
            .iter()
            .map(|c| root.join(c))
            .collect()
    } else {
        args.iter().map(PathBuf::from).collect()
    };
    let mut failed = false;
    for src in &crates {
        match graph::Crate::read(src) {
            Ok(krate) => {
                println!("{}", krate.render());
                let cycles = krate.cycles();
                for cycle in &cycles {
                    failed = true;
                    eprintln!("{}", krate.explain(cycle, &root));
                }
            }
            Err(error) => {
                eprintln!("module-graph: {}: {error}", src.display());
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}

/// The workspace root: the nearest ancestor of this crate's manifest directory with a
/// `Cargo.lock`, or the current directory.
fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|p| p.join("Cargo.lock").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Edges of a graph: from → to → where (file:line) the first reference is written.
pub type Edges = BTreeMap<String, BTreeMap<String, String>>;

/// Names of a crate's modules (top level).
pub type Modules = BTreeSet<String>;
