//! The helper's layer order, checked: every `crate::` reference of every file under `src/` is an
//! edge from the file's top-level module to another, and an edge the table below does not allow
//! fails this test, naming the file and the edge. ARCHITECTURE.md ("Layers") draws the same order.
//!
//! The table lists modules bottom to top; a module may use only modules listed before it, and of
//! those only the ones named in its row. Whole-line comments are skipped (a doc link is no
//! dependency); test modules count like any code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SYS: &str = "sys";

/// Module → the lower modules it may use, bottom to top.
const LAYERS: &[(&str, &[&str])] = &[
    // Leaves: the syscall wrappers, the configuration, error text, cgroups.
    (SYS, &[]),
    ("config", &[]),
    ("error", &[]),
    ("cgroup", &[]),
    // Descriptors, and file work by descriptor.
    ("fds", &[SYS]),
    ("fdfs", &[SYS]),
    ("disk", &[SYS]),
    // Host-wide reservation of a privileged helper's uid ranges.
    ("uidrange", &["fdfs"]),
    // Requests parsed into valid types.
    ("validate", &["config", "disk"]),
    // The sandboxes directory's layout, on the fd filesystem.
    ("dirs", &[SYS, "error", "fdfs", "disk", "validate"]),
    // Process plumbing shared by init, execs, workers and the monitor.
    ("child", &[SYS, "config", "error", "fds", "validate"]),
    ("output", &[SYS, "config", "error", "fds", "fdfs"]),
    // One process of a sandbox (the main command or an exec): its status pipe, outputs, stdin.
    ("process", &[SYS, "output"]),
    // Per-sandbox work, each only on what is below it.
    ("net", &[SYS, "config", "error", "fds", "fdfs", "validate"]),
    (
        "image",
        &[SYS, "config", "error", "fds", "fdfs", "validate", "child"],
    ),
    (
        "sandbox",
        &[
            SYS, "config", "error", "fds", "validate", "child", "output", "net",
        ],
    ),
    (
        "files",
        &[
            SYS, "config", "error", "fds", "fdfs", "validate", "dirs", "child", "image", "sandbox",
        ],
    ),
    (
        "exec",
        &[
            SYS, "config", "error", "fds", "fdfs", "validate", "dirs", "cgroup", "child", "output",
            "process", "sandbox",
        ],
    ),
    // The monitor: the top of per-sandbox code.
    (
        "monitor",
        &[
            SYS, "config", "error", "cgroup", "fds", "fdfs", "disk", "validate", "dirs", "child",
            "output", "process", "net", "image", "sandbox", "exec",
        ],
    ),
    ("preflight", &["cgroup"]),
    ("info", &[SYS, "config", "cgroup", "disk", "preflight"]),
    // Prepare and spawn: the directory, image, cgroup, network and monitor of a new sandbox.
    (
        "spawn",
        &[
            SYS, "config", "error", "cgroup", "disk", "validate", "dirs", "net", "image", "monitor",
        ],
    ),
    // The request loop: dispatches to the workers below it.
    (
        "server",
        &[
            SYS, "config", "error", "cgroup", "fds", "fdfs", "disk", "validate", "dirs", "net",
            "image", "files", "monitor", "info", "spawn",
        ],
    ),
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module of a file below `src/` (`files/mod.rs` → `files`, `sys.rs` → `sys`).
fn module_of(relative: &Path) -> String {
    let first = relative.components().next().unwrap();
    let name = first.as_os_str().to_str().unwrap();
    name.strip_suffix(".rs").unwrap_or(name).to_owned()
}

fn ident_at(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// Every top-level module `source` names through `crate::` (`crate::a::b`, `crate::{a, b::c}`).
fn referenced_modules(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + "crate::".len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue; // e.g. `sandboxd_crate::`, not ours
            }
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a, b::{c, d}}`: the names at depth 0.
                let mut depth = 0;
                let mut expect_name = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => expect_name = true,
                        c if expect_name && depth == 0 && (c.is_ascii_alphabetic() || c == '_') => {
                            found.insert(ident_at(&group[i..]).to_owned());
                            expect_name = false;
                        }
                        _ => {}
                    }
                }
            } else {
                let name = ident_at(rest);
                if !name.is_empty() {
                    found.insert(name.to_owned());
                }
            }
        }
    }
    found
}

/// Every edge of the crate: (from, to) → the files that make it.
fn edges() -> BTreeMap<(String, String), Vec<String>> {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().to_owned();
        let from = module_of(&relative);
        if from == "layers_test" {
            continue;
        }
        let source = std::fs::read_to_string(&file).unwrap();
        for to in referenced_modules(&source) {
            if to != from {
                edges
                    .entry((from.clone(), to))
                    .or_default()
                    .push(format!("server/helper/src/{}", relative.display()));
            }
        }
    }
    edges
}

/// The edges of `edges` that the layer table refuses, as messages.
fn refused(edges: &BTreeMap<(String, String), Vec<String>>) -> Vec<String> {
    let table: BTreeMap<&str, &[&str]> = LAYERS.iter().copied().collect();
    let mut problems = Vec::new();
    for ((from, to), files) in edges {
        if from == "main" {
            continue; // the crate root declares and starts everything
        }
        let Some(allowed) = table.get(from.as_str()) else {
            problems.push(format!(
                "{}: module `{from}` is not in the layer table of layers_test.rs",
                files[0]
            ));
            continue;
        };
        if !allowed.contains(&to.as_str()) {
            problems.push(format!(
                "{}: `{from}` uses `{to}`, which the layer order does not allow \
                 (`{from}` may use: {})",
                files.join(", "),
                allowed.join(", ")
            ));
        }
    }
    problems
}

#[test]
fn every_import_follows_the_layer_order() {
    let problems = refused(&edges());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_table_is_an_order_and_names_every_module() {
    let mut below: BTreeSet<&str> = BTreeSet::new();
    for (module, allowed) in LAYERS {
        for lower in *allowed {
            assert!(
                below.contains(lower),
                "`{module}` may use `{lower}`, which is not listed before it"
            );
        }
        assert!(below.insert(module), "`{module}` is listed twice");
    }
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    for file in files {
        let module = module_of(file.strip_prefix(src_dir()).unwrap());
        if module != "main" && module != "layers_test" {
            assert!(
                below.contains(module.as_str()),
                "module `{module}` ({}) is not in the layer table",
                file.display()
            );
        }
    }
}

#[test]
fn a_sideways_or_upward_edge_is_refused() {
    // The checker itself: edges the order forbids are reported, allowed ones are not.
    let edge = |from: &str, to: &str| {
        let mut e = BTreeMap::new();
        e.insert((from.to_owned(), to.to_owned()), vec![format!("{from}.rs")]);
        refused(&e)
    };
    assert!(edge("net", "sys").is_empty(), "a downward edge is allowed");
    let upward = edge("net", "server");
    assert_eq!(upward.len(), 1, "upward");
    assert!(
        upward[0].starts_with("net.rs: `net` uses `server`"),
        "{upward:?}"
    );
    assert_eq!(
        edge("exec", "monitor").len(),
        1,
        "upward, the old exec → monitor"
    );
    assert_eq!(edge("image", "net").len(), 1, "sideways");
    assert_eq!(
        edge("newmodule", "sys").len(),
        1,
        "a module missing from the table"
    );
}

#[test]
fn references_are_read_from_paths_and_use_groups() {
    let source = "use crate::{sys::{self, own_fd}, validate::IdMap};\n\
                  // crate::monitor in a comment is no edge\n\
                  let x = crate::fdfs::remove_tree(a, b); sandboxd_crate::y();\n";
    let found: Vec<_> = referenced_modules(source).into_iter().collect();
    assert_eq!(found, ["fdfs", "sys", "validate"]);
}
