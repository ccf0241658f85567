//! Reading a crate's module graph and finding its cycles.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::{Edges, Modules};

pub struct Crate {
    pub name: String,
    pub modules: Modules,
    pub edges: Edges,
}

impl Crate {
    /// Reads `src`: every `.rs` file but `lib.rs`/`main.rs` and `src/tests/` belongs to the
    /// top-level module its path starts with.
    pub fn read(src: &Path) -> Result<Crate, String> {
        let name = src
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files = Vec::new();
        walk(src, &mut files).map_err(|e| format!("cannot read: {e}"))?;
        let mut modules = Modules::new();
        let mut sources = Vec::new();
        for file in files {
            let Some(module) = module_of(src, &file) else {
                continue;
            };
            modules.insert(module.clone());
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            sources.push((module, file, text));
        }
        let mut edges = Edges::new();
        for (module, file, text) in &sources {
            for (line, target) in references(&without_tests(text)) {
                if &target == module || !modules.contains(&target) {
                    continue;
                }
                edges
                    .entry(module.clone())
                    .or_default()
                    .entry(target)
                    .or_insert_with(|| format!("{}:{line}", file.display()));
            }
        }
        Ok(Crate {
            name,
            modules,
            edges,
        })
    }

    /// Every strongly connected set of more than one module (Tarjan), each sorted.
    pub fn cycles(&self) -> Vec<Vec<String>> {
        let names: Vec<&String> = self.modules.iter().collect();
        let index_of: BTreeMap<&String, usize> =
            names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let adj: Vec<Vec<usize>> = names
            .iter()
            .map(|n| {
                self.edges
                    .get(*n)
                    .map(|to| to.keys().filter_map(|t| index_of.get(t).copied()).collect())
                    .unwrap_or_default()
            })
            .collect();
        let mut t = Tarjan::new(adj.len());
        for v in 0..adj.len() {
            if t.index[v].is_none() {
                t.visit(v, &adj);
            }
        }
        let mut out: Vec<Vec<String>> = t
            .components
            .into_iter()
            .filter(|c| c.len() > 1)
            .map(|c| {
                let mut c: Vec<String> = c.into_iter().map(|i| names[i].clone()).collect();
                c.sort();
                c
            })
            .collect();
        out.sort();
        out
    }

    /// The modules in layers: each layer names only modules of the layers below it (only
    /// meaningful without cycles; modules in a cycle are listed last).
    pub fn layers(&self) -> Vec<Vec<String>> {
        let mut placed: BTreeSet<String> = BTreeSet::new();
        let mut layers = Vec::new();
        loop {
            let layer: Vec<String> = self
                .modules
                .iter()
                .filter(|m| !placed.contains(*m))
                .filter(|m| {
                    self.edges
                        .get(*m)
                        .is_none_or(|to| to.keys().all(|t| placed.contains(t)))
                })
                .cloned()
                .collect();
            if layer.is_empty() {
                break;
            }
            placed.extend(layer.iter().cloned());
            layers.push(layer);
        }
        let rest: Vec<String> = self
            .modules
            .iter()
            .filter(|m| !placed.contains(*m))
            .cloned()
            .collect();
        if !rest.is_empty() {
            layers.push(rest);
        }
        layers
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "{}: {} modules, lowest layer first\n",
            self.name,
            self.modules.len()
        );
        for (i, layer) in self.layers().iter().enumerate() {
            for m in layer {
                let to: Vec<&String> = self
                    .edges
                    .get(m)
                    .map(|t| t.keys().collect())
                    .unwrap_or_default();
                let to: Vec<&str> = to.iter().map(|s| s.as_str()).collect();
                out.push_str(&format!("  {i:>2} {m} -> {}\n", to.join(", ")));
            }
        }
        out
    }

    /// The cycle's modules and each edge between them, with where it is written.
    pub fn explain(&self, cycle: &[String], root: &Path) -> String {
        let mut out = format!(
            "module-graph: {}: modules in a cycle: {}\n",
            self.name,
            cycle.join(", ")
        );
        for from in cycle {
            if let Some(to) = self.edges.get(from) {
                for (target, at) in to {
                    if cycle.contains(target) {
                        let at = at
                            .strip_prefix(&format!("{}/", root.display()))
                            .unwrap_or(at);
                        out.push_str(&format!("  {from} -> {target} ({at})\n"));
                    }
                }
            }
        }
        out
    }
}

struct Tarjan {
    next: usize,
    index: Vec<Option<usize>>,
    low: Vec<usize>,
    stack: Vec<usize>,
    on_stack: Vec<bool>,
    components: Vec<Vec<usize>>,
}

impl Tarjan {
    fn new(n: usize) -> Self {
        Self {
            next: 0,
            index: vec![None; n],
            low: vec![0; n],
            stack: Vec::new(),
            on_stack: vec![false; n],
            components: Vec::new(),
        }
    }

    fn visit(&mut self, v: usize, adj: &[Vec<usize>]) {
        self.index[v] = Some(self.next);
        self.low[v] = self.next;
        self.next += 1;
        self.stack.push(v);
        self.on_stack[v] = true;
        for &w in &adj[v] {
            match self.index[w] {
                None => {
                    self.visit(w, adj);
                    self.low[v] = self.low[v].min(self.low[w]);
                }
                Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(self.low[v]) == self.index[v] {
            let mut component = Vec::new();
            while let Some(w) = self.stack.pop() {
                self.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            self.components.push(component);
        }
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The top-level module a file belongs to; `None` for the crate root and for tests.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    if rel.components().count() == 1 {
        let stem = first.strip_suffix(".rs")?;
        return match stem {
            "lib" | "main" | "tests" => None,
            other => Some(other.to_string()),
        };
    }
    (first != "tests").then_some(first)
}

/// The text before the file's `#[cfg(test)]` test module (kept by convention at the end).
fn without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `(line, module)` for each `crate::module` the text names (comments skipped), including
/// the members of `use crate::{a, b::c}` groups.
fn references(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            // `llorch_http::crate::` cannot occur; `$crate::` (macros) is not a module path.
            let before = rest[..i].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                rest = after;
                continue;
            }
            if let Some(group) = after.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.push((n + 1, name));
                    }
                }
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push((n + 1, name));
                }
            }
            rest = after;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_read_from_paths_uses_and_groups_but_not_comments() {
        let text = "use crate::state::Orchestrator;\nuse crate::{api, tasks::Task};\nlet x = crate::metrics::m(); // crate::ignored\n$crate::not\n";
        let got: Vec<_> = references(text).into_iter().map(|(_, m)| m).collect();
        assert_eq!(got, ["state", "api", "tasks", "metrics"]);
    }

    #[test]
    fn a_cycle_is_found_and_layers_order_the_rest() {
        let mut edges = Edges::new();
        for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a"), ("e", "d")] {
            edges
                .entry(a.into())
                .or_default()
                .insert(b.into(), "x:1".into());
        }
        let modules: Modules = ["a", "b", "c", "d", "e", "f"].map(String::from).into();
        let k = Crate {
            name: "k".into(),
            modules,
            edges,
        };
        assert_eq!(k.cycles(), vec![vec!["a", "b", "c"]]);
        let layers = k.layers();
        assert_eq!(layers[0], ["f"]);
        assert_eq!(
            layers.last().unwrap().len(),
            5,
            "the cycle and what stands on it, last"
        );
    }

    #[test]
    fn test_modules_are_left_out() {
        let text = "use crate::a;\n#[cfg(test)]\nmod tests {\n    use crate::b;\n}\n";
        let got: Vec<_> = references(&without_tests(text))
            .into_iter()
            .map(|(_, m)| m)
            .collect();
        assert_eq!(got, ["a"]);
        let src = Path::new("/s");
        assert_eq!(module_of(src, Path::new("/s/tests/kit.rs")), None);
        assert_eq!(module_of(src, Path::new("/s/lib.rs")), None);
        assert_eq!(
            module_of(src, Path::new("/s/openai/job.rs")).as_deref(),
            Some("openai")
        );
        assert_eq!(
            module_of(src, Path::new("/s/api.rs")).as_deref(),
            Some("api")
        );
    }
}
