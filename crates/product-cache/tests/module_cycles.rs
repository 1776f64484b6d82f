//! The library's modules form layers: no module imports one that imports it back, directly or
//! through others. A cycle is how the Redis layer lost its shape before (six files of
//! `impl RedisCache` importing each other); this test keeps it from coming back.
//!
//! The graph is read from the sources, file by file: an edge for every `crate::`, `super::` and
//! `self::` path that names another file's module (comment lines and `#[cfg(test)]` modules
//! left out). A parent's references to its own children (its `mod` lines and re-exports) are
//! not edges: a parent as its children's vocabulary is the usual Rust shape.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path (`["cache", "node", "call"]`; `[]` for the crate root) and its file.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            out.insert(parts, path);
        }
    }
    out
}

/// The paths a file's code names: each `crate::a::b`, `super::a`, `self::a` and each member of
/// a `use x::{a, b::c}` group, as (head, rest).
fn paths(text: &str) -> Vec<(String, Vec<String>)> {
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for head in ["crate", "super", "self"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(head) {
            let start = from + at;
            from = start + head.len();
            let boundary = start == 0 || !is_ident(bytes[start - 1]);
            if !boundary || !code[from..].starts_with("::") {
                continue;
            }
            let (prefix, group) = path_from(&code[from..]);
            match group {
                Some(members) => {
                    for member in members {
                        let mut rest = prefix.clone();
                        rest.extend(member);
                        out.push((head.to_owned(), rest));
                    }
                }
                None => out.push((head.to_owned(), prefix)),
            }
        }
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The segments of `::a::b::c` at the start of `s`, and a `{...}` group's members if the path
/// ends in one.
fn path_from(s: &str) -> (Vec<String>, Option<Vec<Vec<String>>>) {
    let mut segments = Vec::new();
    let mut rest = s;
    while let Some(after) = rest.strip_prefix("::") {
        let after = after.trim_start();
        if let Some(group) = after.strip_prefix('{') {
            let end = matching_brace(group);
            let members = split_top(&group[..end])
                .into_iter()
                .map(|m| {
                    let m = m.split(" as ").next().unwrap_or_default().trim();
                    m.split("::")
                        .map(|p| p.trim().to_owned())
                        .filter(|p| !p.is_empty() && p != "{" && p != "}")
                        .collect()
                })
                .collect();
            return (segments, Some(members));
        }
        let len = after.bytes().take_while(|&b| is_ident(b)).count();
        if len == 0 {
            break;
        }
        segments.push(after[..len].to_owned());
        rest = &after[len..];
    }
    (segments, None)
}

fn matching_brace(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    s.len()
}

/// A group's members, split at the commas outside nested braces (nested groups are taken as
/// their prefix: enough to name the module they are in).
fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut depth, mut current) = (Vec::new(), 0, String::new());
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut current));
                continue;
            }
            _ if depth > 0 => continue,
            _ => {}
        }
        current.push(c);
    }
    out.push(current);
    out.into_iter().filter(|m| !m.trim().is_empty()).collect()
}

/// The module graph of the crate under `src`: module -> the modules it uses.
fn graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let modules = modules(src);
    let resolve = |parts: &[String]| -> Option<Vec<String>> {
        (0..=parts.len())
            .rev()
            .map(|k| parts[..k].to_vec())
            .find(|m| modules.contains_key(m))
    };
    let mut edges = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).unwrap();
        let parent = matches!(
            file.file_stem().and_then(|s| s.to_str()),
            Some("mod" | "lib" | "main")
        );
        // The module `self` names: the file's own; `super` is its parent.
        let mut targets = BTreeSet::new();
        for (head, mut rest) in paths(&text) {
            let mut base: Vec<String> = match head.as_str() {
                "crate" => Vec::new(),
                "self" => module.clone(),
                _ => module[..module.len().saturating_sub(1)].to_vec(),
            };
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest.remove(0);
            }
            base.extend(rest);
            let Some(target) = resolve(&base) else {
                continue;
            };
            if &target == module || (parent && target.starts_with(module)) {
                continue;
            }
            targets.insert(target);
        }
        edges.insert(module.clone(), targets);
    }
    edges
}

/// The cycles of `graph`: each group of modules that reach each other (Tarjan's strongly
/// connected components of more than one module).
fn cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'g Vec<String>, usize>,
        low: BTreeMap<&'g Vec<String>, usize>,
        stack: Vec<&'g Vec<String>>,
        out: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g Vec<String>) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            for w in &self.graph[v] {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.stack.contains(&w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    component.push(if w.is_empty() {
                        "lib".to_owned()
                    } else {
                        w.join("/")
                    });
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.out.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !tarjan.index.contains_key(v) {
            tarjan.visit(v);
        }
    }
    tarjan.out
}

#[test]
fn the_library_has_no_module_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    assert!(
        graph.len() > 30,
        "the crate's modules were not found: {graph:?}"
    );
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "modules that import each other (each line one cycle):\n{}",
        found
            .iter()
            .map(|c| c.join(", "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The check itself catches a cycle: a tree of its own where two files import each other
/// through a group `use`, a third through a plain path.
#[test]
fn a_cycle_is_found() {
    let dir = std::env::temp_dir().join(format!("module-cycles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("cache")).unwrap();
    let write = |path: &str, text: &str| std::fs::write(dir.join(path), text).unwrap();
    write("lib.rs", "pub mod cache;\npub mod store;\n");
    write("cache/mod.rs", "mod a;\nmod b;\npub use self::a::A;\n");
    write(
        "cache/a.rs",
        "use super::{b::B, CacheError};\npub struct A;\n",
    );
    write(
        "cache/b.rs",
        "// use super::a::A; (a comment is no edge)\npub fn f() -> crate::cache::a::A { todo!() }\n",
    );
    write(
        "store.rs",
        "pub fn g() {}\n#[cfg(test)]\nmod tests { use crate::cache::a::A; }\n",
    );
    let found = cycles(&graph(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        found,
        vec![vec!["cache/a".to_owned(), "cache/b".to_owned()]]
    );
}
