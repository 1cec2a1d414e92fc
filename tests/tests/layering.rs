//! The layering the crate headers promise, read off the sources so that it cannot drift:
//! - no module of any crate imports, through its imports, a module that imports it back (the
//!   graph of `crate::` and `super::` paths between modules, parent and child aside);
//! - ferry-edge and ferry-cloud use locks that do not poison (no `std::sync::Mutex`/`RwLock`);
//! - one place writes ferryd's request records (the ledger);
//! - the `ferry` binary's `main.rs` only parses and dispatches (at most 150 lines);
//! - ferryd does not compile the TMO trainer (ferry-router's `train` feature).
//!
//! Comments and each file's trailing `#[cfg(test)] mod tests` are left out: tests may reach
//! anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use ferry_integration::repo_root;

/// Module path (segments under `crate`) → source file, for one crate's `src/`.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<Vec<String>, PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, src, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src).unwrap().with_extension("");
                let mut segs: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if matches!(
                    segs.last().map(String::as_str),
                    Some("mod" | "lib" | "main")
                ) {
                    segs.pop();
                }
                // Generated code (ferry-proto's prost output) is not ours to layer.
                if segs.first().is_some_and(|s| s == "gen") {
                    continue;
                }
                out.insert(segs, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The source without comments and without its trailing test module.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| match l.find("//") {
            // `//` inside a string literal (a URL) cuts the line short: that can only hide a
            // path, never invent one.
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path the code names from `crate::` or `super::`, as absolute segments; one level of
/// braces in a `use` is expanded (`use crate::{a, b::c}`).
fn paths(module: &[String], code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let starts_path = i == 0 || !(ident(bytes[i - 1]) || bytes[i - 1] == b':');
        if !(starts_path
            && (bytes[i..].starts_with(b"crate::") || bytes[i..].starts_with(b"super::")))
        {
            i += 1;
            continue;
        }
        // At an ASCII byte, so a char boundary.
        let rest = &code[i..];
        let (base, skip) = if rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else {
            let mut n = 0;
            let mut j = 0;
            while rest[j..].starts_with("super::") {
                n += 1;
                j += "super::".len();
            }
            (module[..module.len().saturating_sub(n)].to_vec(), j)
        };
        let tail = &rest[skip..];
        let end = tail
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let head = &tail[..end];
        if tail[end..].starts_with('{') {
            let prefix: Vec<String> = head
                .split("::")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            let close = tail[end..].find('}').map_or(tail.len(), |c| end + c);
            for item in tail[end + 1..close].split(',') {
                let mut p = base.clone();
                p.extend(prefix.iter().cloned());
                p.extend(
                    item.trim()
                        .split("::")
                        .map(|s| s.trim().to_string())
                        .filter(|s| {
                            !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')
                        }),
                );
                out.push(p);
            }
        } else {
            let mut p = base;
            p.extend(head.split("::").filter(|s| !s.is_empty()).map(String::from));
            out.push(p);
        }
        i += skip + end;
    }
    out
}

/// The import graph between one crate's modules, parent and child edges aside.
fn graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mods = modules(src);
    let resolve = |p: &[String]| {
        let mut p = p.to_vec();
        while !p.is_empty() && !mods.contains_key(&p) {
            p.pop();
        }
        p
    };
    let mut g = BTreeMap::new();
    for (m, file) in &mods {
        let deps: BTreeSet<Vec<String>> = paths(m, &code(file))
            .iter()
            .map(|p| resolve(p))
            .filter(|d| !d.is_empty() && !d.starts_with(m) && !m.starts_with(d))
            .collect();
        g.insert(m.clone(), deps);
    }
    g
}

/// The graph with each module cut to its first `depth` segments: a cycle between whole
/// subtrees (a module's children importing a module that imports the parent) shows here.
fn collapsed(
    g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    depth: usize,
) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let cut = |m: &Vec<String>| m[..m.len().min(depth)].to_vec();
    let mut out: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, deps) in g {
        let from = cut(m);
        let entry = out.entry(from.clone()).or_default();
        for d in deps {
            let to = cut(d);
            if !to.starts_with(&from) && !from.starts_with(&to) {
                entry.insert(to);
            }
        }
    }
    out
}

/// One cycle of the graph, if it has any.
fn cycle(g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<Vec<String>>> {
    fn visit(
        v: &Vec<String>,
        g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        if let Some(at) = stack.iter().position(|s| s == v) {
            let mut c = stack[at..].to_vec();
            c.push(v.clone());
            return Some(c);
        }
        if !done.insert(v.clone()) {
            return None;
        }
        stack.push(v.clone());
        for w in g.get(v).into_iter().flatten() {
            if let Some(c) = visit(w, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for v in g.keys() {
        if let Some(c) = visit(v, g, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// A cycle between modules, or between subtrees at any depth.
fn any_cycle(g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<Vec<String>>> {
    let deepest = g.keys().map(Vec::len).max().unwrap_or(0);
    (1..=deepest).find_map(|depth| cycle(&collapsed(g, depth)))
}

fn crates() -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = fs::read_dir(repo_root().join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("src").is_dir())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                p.join("src"),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let mut found = Vec::new();
    for (name, src) in crates() {
        let g = graph(&src);
        assert!(
            g.len() > 1 || name == "ferry-proto",
            "{name}: no modules found"
        );
        if let Some(c) = cycle(&g) {
            let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
            found.push(format!("{name}: {}", names.join(" -> ")));
        }
    }
    assert!(
        found.is_empty(),
        "module import cycles:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_cycle_check_sees_cycles() {
    // The check itself, on a made-up crate: a -> b -> a through a grouped import and super.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    fs::write(src.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
    fs::write(src.join("a.rs"), "use crate::{b::Thing, Other};\n").unwrap();
    fs::create_dir(src.join("b")).unwrap();
    fs::write(src.join("b/mod.rs"), "mod c;\npub struct Thing;\n").unwrap();
    fs::write(
        src.join("b/c.rs"),
        "// crate::nothing in a comment\nfn f() { super::super::a::g() }\n",
    )
    .unwrap();
    let g = graph(src);
    let c = any_cycle(&g).expect("a cycle");
    let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
    assert!(names.contains(&"a".to_string()), "{names:?}");
    fs::write(src.join("b/c.rs"), "fn f() {}\n").unwrap();
    assert_eq!(any_cycle(&graph(src)), None);
    // A plain two-module cycle, no subtrees involved.
    fs::write(src.join("b/mod.rs"), "mod c;\nfn h() { crate::a::g() }\n").unwrap();
    assert!(cycle(&graph(src)).is_some());
}

#[test]
fn the_daemons_use_locks_that_do_not_poison() {
    for name in ["ferry-edge", "ferry-cloud", "ferry-daemon"] {
        let src = repo_root().join("crates").join(name).join("src");
        for (m, file) in modules(&src) {
            let code = code(&file);
            for bad in [
                "std::sync::Mutex",
                "std::sync::RwLock",
                "sync::{Mutex",
                "sync::{RwLock",
            ] {
                assert!(
                    !code.contains(bad),
                    "{name}::{} uses {bad}: use parking_lot (or tokio's where awaited)",
                    m.join("::")
                );
            }
        }
    }
}

#[test]
fn only_the_ledger_writes_request_records() {
    let src = repo_root().join("crates/ferry-edge/src");
    let writers: Vec<String> = modules(&src)
        .into_iter()
        .filter(|(_, file)| code(file).contains("records.insert(RequestRecord"))
        .map(|(m, _)| m.join("::"))
        .collect();
    assert_eq!(writers, vec!["ledger".to_string()]);
}

#[test]
fn the_cli_main_only_parses_and_dispatches() {
    let main = fs::read_to_string(repo_root().join("crates/ferry-cli/src/main.rs")).unwrap();
    let lines = main.lines().count();
    assert!(
        lines <= 150,
        "crates/ferry-cli/src/main.rs has {lines} lines"
    );
}

#[test]
fn ferryd_does_not_compile_the_tmo_trainer() {
    let manifest = fs::read_to_string(repo_root().join("crates/ferry-edge/Cargo.toml")).unwrap();
    let doc: toml::Table = manifest.parse().unwrap();
    let router = &doc["dependencies"]["ferry-router"];
    let features = router
        .get("features")
        .and_then(|f| f.as_array())
        .map(|f| f.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(
        !features.contains(&"train"),
        "ferry-edge enables ferry-router/train"
    );
    let ferry_features = doc
        .get("features")
        .and_then(|f| f.as_table())
        .map(|t| {
            t.values()
                .flat_map(|v| v.as_array().cloned().unwrap_or_default())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(
        !ferry_features
            .iter()
            .any(|f| f.as_str() == Some("ferry-router/train")),
        "a ferry-edge feature enables ferry-router/train"
    );
    // And the trainer really sits behind the feature.
    let tmo = fs::read_to_string(repo_root().join("crates/ferry-router/src/tmo/mod.rs")).unwrap();
    assert!(tmo.contains("#[cfg(feature = \"train\")]\npub mod learn;"));
}
