//! The layering rule of ARCHITECTURE.md, checked on the source: every file of `src/`
//! imports only files of its own floor or below, and the imports between files form no
//! cycle. A folder's `mod.rs` and the files directly in it are one module split across
//! files (they name each other through `super::` and child paths freely); every other
//! pair of files imports one way only. Test-only files and `#[cfg(test)]` modules are
//! left out: tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The floors of `src/lib.rs`, top first; a module imports only its floor and below.
const FLOORS: &[&[&str]] = &[
    &["lib", "listener", "demo", "import"],
    &["client", "admin", "reload"],
    &["shared"],
    &[
        "cancel", "cluster", "params", "pool", "prepared", "server", "auth", "tls", "router",
    ],
    &[
        "config", "error", "metrics", "protocol", "registry", "shutdown", "stream",
    ],
];

fn floor_of(top: &str) -> usize {
    FLOORS
        .iter()
        .position(|f| f.contains(&top))
        .unwrap_or_else(|| panic!("src/{top} is in no floor of FLOORS (and of src/lib.rs)"))
}

/// A file's module path: `src/client/session/io.rs` is `client::session::io`,
/// `src/pool/mod.rs` is `pool`, `src/lib.rs` is `lib` (the crate root).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    parts
}

fn is_test_file(file: &Path) -> bool {
    let name = file.file_name().unwrap().to_string_lossy();
    name == "tests.rs"
        || name.ends_with("_tests.rs")
        || file.iter().any(|p| p == "tests")
        || name == "main.rs"
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments, string literals and `#[cfg(test)]` modules.
fn code_of(text: &str) -> String {
    // Drop line comments and strings (a doc comment or a message may say `crate::x`).
    let mut code = String::with_capacity(text.len());
    for line in text.lines() {
        let mut out = String::new();
        let mut in_str = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if in_str {
                if c == '\\' {
                    chars.next();
                } else if c == '"' {
                    in_str = false;
                }
                continue;
            }
            if c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' {
                in_str = true;
                continue;
            }
            out.push(c);
        }
        code.push_str(&out);
        code.push('\n');
    }
    // Cut every `#[cfg(test)] mod name { ... }` (braces counted).
    while let Some(at) = code.find("#[cfg(test)]") {
        let after = &code[at..];
        let Some(open) = after.find(['{', ';']) else {
            break;
        };
        let mut end = at + open + 1;
        if after.as_bytes()[open] == b'{' {
            let mut depth = 1;
            for (i, b) in code[end..].bytes().enumerate() {
                match b {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end += i + 1;
                    break;
                }
            }
        }
        code.replace_range(at..end, "");
    }
    code
}

/// Every path the code names from `crate::` or `super::`, with `use` groups expanded:
/// `crate::pool::{Pool, set::PoolSet}` gives `pool::Pool` and `pool::set::PoolSet`.
fn named_paths(code: &str, module: &[String], is_mod_rs: bool) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &code[i..];
        let start = if rest.starts_with("crate::") {
            Some((Vec::new(), "crate::".len()))
        } else if rest.starts_with("super::") {
            // `super` of a file module is its parent; of a folder's mod.rs, the folder's
            // parent.
            let mut base = module.to_vec();
            let _ = is_mod_rs;
            base.pop();
            let mut len = "super::".len();
            while code[i + len..].starts_with("super::") {
                base.pop();
                len += "super::".len();
            }
            Some((base, len))
        } else {
            None
        };
        match start {
            Some((base, len)) if i == 0 || !ident(bytes[i - 1]) => {
                let (paths, used) = parse_tree(&code[i + len..]);
                for p in paths {
                    let mut full = base.clone();
                    full.extend(p);
                    out.push(full);
                }
                i += len + used.max(1);
            }
            _ => i += 1,
        }
    }
    out
}

/// Parses a use tree (`a::b`, `a::{b, c::d}`, `*`) at the start of `s`: its paths and
/// the bytes read.
fn parse_tree(s: &str) -> (Vec<Vec<String>>, usize) {
    let b = s.as_bytes();
    let mut i = 0;
    let mut prefix = Vec::new();
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            i += 1;
            let mut all = Vec::new();
            loop {
                while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
                    i += 1;
                }
                if i >= b.len() || b[i] == b'}' {
                    i += 1;
                    break;
                }
                let (sub, used) = parse_tree(&s[i..]);
                for p in sub {
                    let mut full = prefix.clone();
                    full.extend(p);
                    all.push(full);
                }
                i += used.max(1);
            }
            return (all, i);
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i == start {
            // `*` or nothing: the prefix itself.
            if i < b.len() && b[i] == b'*' {
                i += 1;
            }
            return (vec![prefix], i);
        }
        prefix.push(s[start..i].to_string());
        if s[i..].starts_with("::") {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

#[test]
fn files_import_only_what_stands_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| !is_test_file(f));
    files.sort();

    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .map(|f| (module_of(&src, f), f.clone()))
        .collect();
    let name = |m: &[String]| {
        if m.is_empty() {
            "lib".to_string()
        } else {
            m.join("::")
        }
    };
    // A named path belongs to the longest module that starts it.
    let owner = |path: &[String]| -> Option<Vec<String>> {
        (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|m| modules.contains_key(m))
    };

    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut upward = Vec::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).expect("read source");
        let is_mod_rs = file.file_name().is_some_and(|n| n == "mod.rs");
        let here = module.first().map_or("lib", |s| s.as_str());
        for path in named_paths(&code_of(&text), module, is_mod_rs) {
            let Some(target) = owner(&path) else { continue };
            if &target == module {
                continue;
            }
            // A folder's mod.rs and the files directly in it are one module.
            let parent_child = |a: &[String], b: &[String]| {
                b.len() == a.len() + 1 && b.starts_with(a) && {
                    let f = &modules[&a.to_vec()];
                    f.file_name().is_some_and(|n| n == "mod.rs")
                }
            };
            if parent_child(module, &target) || parent_child(&target, module) {
                continue;
            }
            let there = target.first().map_or("lib", |s| s.as_str());
            if floor_of(there) < floor_of(here) {
                upward.push(format!(
                    "{} ({here}, floor {}) imports {} ({there}, floor {})",
                    name(module),
                    floor_of(here),
                    name(&target),
                    floor_of(there)
                ));
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));

    // No cycle: a depth-first search that finds no edge back into the current path.
    fn visit(
        m: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        path: &mut Vec<Vec<String>>,
        cycles: &mut Vec<Vec<Vec<String>>>,
    ) {
        match state.get(m) {
            Some(2) => return,
            Some(1) => {
                let at = path.iter().position(|p| p == m).unwrap();
                let mut c = path[at..].to_vec();
                c.push(m.clone());
                cycles.push(c);
                return;
            }
            _ => {}
        }
        state.insert(m.clone(), 1);
        path.push(m.clone());
        for next in edges.get(m).into_iter().flatten() {
            visit(next, edges, state, path, cycles);
        }
        path.pop();
        state.insert(m.clone(), 2);
    }
    let mut state = BTreeMap::new();
    let mut cycles = Vec::new();
    for m in modules.keys() {
        visit(m, &edges, &mut state, &mut Vec::new(), &mut cycles);
    }
    let shown: Vec<String> = cycles
        .iter()
        .map(|c| c.iter().map(|m| name(m)).collect::<Vec<_>>().join(" -> "))
        .collect();
    assert!(shown.is_empty(), "import cycles:\n{}", shown.join("\n"));
    // The check saw the imports it is about.
    let total: usize = edges.values().map(|e| e.len()).sum();
    assert!(total > 100, "only {total} imports between files found");
}
