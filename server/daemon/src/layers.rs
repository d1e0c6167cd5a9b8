//! The daemon's layer order, checked: every `crate::` path in a module's (non-test) code must
//! name a module of a lower layer, so no import goes sideways or up and no cycle can form.
//! ARCHITECTURE.md ("Layers" under the daemon) describes the same order. Compiled for tests
//! only.

/// The modules of the library, lowest layer first. A module may use modules of lower layers
/// only (and the crate root's helpers in [`ROOT_ITEMS`]).
pub const LAYERS: &[&[&str]] = &[
    // Leaves: the clock, the privilege drop, request validation.
    &["lifetime", "privileges", "validate"],
    // Resource limit policy (on top of validation).
    &["limits"],
    // The free-space reserve (sizes parsed as limits are).
    &["storage"],
    // The resources the services use: configuration, SQL, the helper, the output logs.
    &["config", "store", "helper_client", "logs"],
    // The services: the sandbox lifecycle (execs, files, images), tokens and tickets.
    &["sandboxes", "auth"],
    // HTTP handlers.
    &["api"],
    // Listeners and connection handling around the router.
    &["transport"],
];

/// Items of the crate root (`lib.rs`) any module may use.
pub const ROOT_ITEMS: &[&str] = &["now_unix_ms", "chain"];

/// Layered, but still off limits: handlers reach SQL and the helper through the services only.
pub const FORBIDDEN: &[(&str, &str)] = &[("api", "store"), ("api", "helper_client")];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The code of a source file without its tests (everything from the first `#[cfg(test)]`) and
/// without comments.
fn code_of(source: &str) -> String {
    let code = source.split("#[cfg(test)]").next().unwrap_or("");
    code.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::<name>` in `code`.
fn crate_paths(code: &str) -> Vec<String> {
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // Not the tail of another path (`sandboxd_crate::`) or identifier.
            !code[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// What is wrong with module `module` using the paths in `source`.
pub fn violations(module: &str, source: &str) -> Vec<String> {
    let Some(own) = layer_of(module) else {
        return vec![format!("{module}: not in the layer table")];
    };
    let mut out = Vec::new();
    for target in crate_paths(&code_of(source)) {
        if ROOT_ITEMS.contains(&target.as_str()) {
            continue;
        }
        match layer_of(&target) {
            None => out.push(format!("{module} -> {target}: not in the layer table")),
            Some(t) if t >= own => out.push(format!(
                "{module} (layer {own}) -> {target} (layer {t}): only lower layers"
            )),
            Some(_) if FORBIDDEN.contains(&(module, target.as_str())) => {
                out.push(format!("{module} -> {target}: goes through the services"))
            }
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The top-level module a source file belongs to; `None` for the crate root, the binary
    /// and test files.
    fn module_of(rel: &Path) -> Option<String> {
        let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
        let is_test = rel
            .components()
            .any(|c| c.as_os_str() == "tests" || c.as_os_str() == "tests.rs");
        // This file holds the check itself (and is compiled for tests only).
        if is_test || ["lib.rs", "main.rs", "layers.rs"].contains(&first.as_str()) {
            return None;
        }
        Some(first.trim_end_matches(".rs").to_owned())
    }

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn every_edge_goes_down_the_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut modules = std::collections::BTreeSet::new();
        let mut wrong = Vec::new();
        for file in &files {
            let rel = file.strip_prefix(&src).unwrap();
            let Some(module) = module_of(rel) else {
                continue;
            };
            let source = std::fs::read_to_string(file).unwrap();
            wrong.extend(
                violations(&module, &source)
                    .into_iter()
                    .map(|v| format!("{}: {v}", rel.display())),
            );
            modules.insert(module);
        }
        assert!(wrong.is_empty(), "layer violations:\n{}", wrong.join("\n"));
        // Every module of the table exists (a renamed module must be renamed here too).
        let table: std::collections::BTreeSet<String> = LAYERS
            .iter()
            .flat_map(|l| l.iter().map(|m| (*m).to_owned()))
            .collect();
        assert_eq!(modules, table);
    }

    #[test]
    fn the_check_catches_sideways_upward_and_unknown_edges() {
        let ok = "use crate::store::Store;\nlet t = crate::now_unix_ms();";
        assert!(violations("sandboxes", ok).is_empty());
        // Up (the reaper once used `api::chain`), sideways, through the services, unknown.
        assert_eq!(violations("sandboxes", "use crate::api::chain;").len(), 1);
        assert_eq!(
            violations("store", "x = crate::helper_client::list(h)").len(),
            1
        );
        assert_eq!(violations("api", "use crate::store::ListQuery;").len(), 1);
        assert_eq!(violations("lifetime", "use crate::wherever;").len(), 1);
        assert_eq!(violations("nowhere", "").len(), 1);
        // Tests and comments do not count; other crates' paths do not either.
        let ignored = "// see crate::api\nfn f() {}\n#[cfg(test)]\nmod tests { use crate::api; }";
        assert!(violations("store", ignored).is_empty());
        assert!(violations("store", "use sandboxd_crate::api;").is_empty());
    }
}
