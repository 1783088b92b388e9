//! Repository rules turned into tests (rust-analyzer's `tidy.rs`): they run with
//! `cargo test -p xtask`, so `cargo xtask test` enforces them.

use std::fs;
use std::path::{Path, PathBuf};

/// Runtime crates that `cache-core` must never depend on: it is runtime-agnostic by design.
const RUNTIME_CRATES: &[&str] = &["tokio", "async-std", "smol", "async-io"];

/// The thin adapter crates, whose `src/lib.rs` must stay small.
const ADAPTERS: &[&str] = &["cache-tokio", "cache-async-std", "cache-smol"];
const ADAPTER_MAX_LINES: usize = 200;

#[test]
fn every_source_file_starts_with_a_module_doc_comment() {
    let mut offenders = Vec::new();
    for member in workspace_members() {
        for file in rust_files(&project_root().join(&member).join("src")) {
            let text = read(&file);
            if !text.starts_with("//!") {
                offenders.push(relative(&file));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "files that do not start with `//!`: {offenders:#?}"
    );
}

#[test]
fn no_ignored_tests() {
    // Spelled in two parts so this file does not match itself.
    let attribute = concat!("#[", "ignore");
    let mut offenders = Vec::new();
    for file in rust_files(&project_root()) {
        for (number, line) in read(&file).lines().enumerate() {
            let line = line.trim_start();
            let is_ignore = line
                .strip_prefix(attribute)
                .is_some_and(|rest| rest.trim_start().starts_with([']', '=', '(']));
            if is_ignore {
                offenders.push(format!("{}:{}", relative(&file), number + 1));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "ignored tests do not run in CI; fix or delete them: {offenders:#?}"
    );
}

#[test]
fn docs_cite_the_contract_in_the_repository() {
    // The behaviour contract lives in docs/contract.md; citations of a "SPEC" section named
    // a page outside the repository. Spelled in two parts so this file does not match itself.
    let needle = concat!("SPEC", " §").as_bytes();
    let mut offenders = Vec::new();
    let mut pending = vec![project_root()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    pending.push(path);
                }
                continue;
            }
            let bytes = fs::read(&path).unwrap_or_default();
            for (number, line) in bytes.split(|&b| b == b'\n').enumerate() {
                if line.windows(needle.len()).any(|w| w == needle) {
                    offenders.push(format!("{}:{}", relative(&path), number + 1));
                }
            }
        }
    }
    offenders.sort();
    assert!(
        offenders.is_empty(),
        "cite the contract as `docs/contract.md#section` or `contract: Section N`: {offenders:#?}"
    );
}

#[test]
fn cache_core_depends_on_no_runtime() {
    let manifest = read(&project_root().join("cache-core/Cargo.toml"));
    let found = runtime_dependencies(&manifest);
    assert!(
        found.is_empty(),
        "cache-core must stay runtime-agnostic, but depends on {found:?}"
    );
}

#[test]
fn the_runtime_dependency_check_detects_each_spelling() {
    let manifest = r#"
[package]
name = "tokio-is-not-a-dependency-here"

[dependencies]
futures.workspace = true
tokio = { version = "1" }
rt = { package = "smol", version = "2" }

[dependencies.async-io]
version = "2"

[target.'cfg(unix)'.dependencies]
async-std.workspace = true

[dev-dependencies]
tokio = "1"
"#;
    assert_eq!(
        runtime_dependencies(manifest),
        ["tokio", "smol", "async-io", "async-std"]
    );
    assert!(runtime_dependencies("[dependencies]\ntokio-util = \"0.7\"\n").is_empty());
}

#[test]
fn adapter_crates_stay_thin() {
    for adapter in ADAPTERS {
        let lib = project_root().join(adapter).join("src/lib.rs");
        let lines = read(&lib).lines().count();
        assert!(
            lines < ADAPTER_MAX_LINES,
            "{adapter}/src/lib.rs has {lines} lines; an adapter is glue, keep it under \
             {ADAPTER_MAX_LINES} and put logic in cache-core"
        );
    }
}

#[test]
fn every_workspace_member_is_in_the_test_matrix() {
    let matrix = read(&project_root().join("xtask/src/matrix.rs"));
    let missing: Vec<String> = workspace_members()
        .into_iter()
        .filter(|member| !matrix.contains(&format!("\"{member}\"")))
        .collect();
    assert!(
        missing.is_empty(),
        "add a row to xtask/src/matrix.rs for {missing:?}"
    );
}

// ===== helpers =====

#[test]
fn readme_quick_starts_are_the_compiled_examples() {
    // The README shows each adapter's `examples/quickstart.rs` verbatim, so the quick starts a
    // user pastes are the ones `cargo test` compiles and the crate docs run.
    let readme = read(&project_root().join("README.md"));
    for adapter in ADAPTERS {
        let example = read(&project_root().join(adapter).join("examples/quickstart.rs"));
        assert!(
            readme.contains(&example),
            "README.md does not contain {adapter}/examples/quickstart.rs verbatim"
        );
    }
}

#[test]
fn readme_shows_the_two_commands() {
    let readme = read(&project_root().join("README.md"));
    for command in ["cargo run -p demo-agent", "cargo xtask test"] {
        assert!(
            readme.contains(command),
            "README.md does not show `{command}`"
        );
    }
}

/// Crates whose modules must stack: every `use crate::…` / `use super::…` points to a module
/// that does not (directly or through others) import the importing one.
const LAYERED_CRATES: &[&str] = &["cache-core", "demo-agent"];

#[test]
fn modules_import_without_loops() {
    for krate in LAYERED_CRATES {
        let graph = import_graph(&project_root().join(krate).join("src"));
        let cycles = find_cycles(&graph);
        assert!(
            cycles.is_empty(),
            "{krate}: modules that import each other (directly or around a loop): {cycles:#?}"
        );
    }
}

#[test]
fn the_import_loop_check_finds_a_loop() {
    let mut graph = std::collections::BTreeMap::new();
    graph.insert("a".to_owned(), vec!["b".to_owned()]);
    graph.insert("b".to_owned(), vec!["c".to_owned()]);
    graph.insert("c".to_owned(), vec!["a".to_owned()]);
    graph.insert("d".to_owned(), vec!["a".to_owned()]);
    assert_eq!(find_cycles(&graph).len(), 1);
    graph.insert("c".to_owned(), Vec::new());
    assert!(find_cycles(&graph).is_empty());
}

/// Module path (`watch::sink`) → the modules its `use crate::`/`use super::` lines name.
/// `#[cfg(test)]` blocks are left out (test code may reach anywhere).
fn import_graph(src: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
    let module_of = |file: &Path| -> String {
        let rel = file.strip_prefix(src).unwrap_or(file).with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        parts.join("::")
    };
    let files = rust_files(src);
    let modules: std::collections::BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut graph = std::collections::BTreeMap::new();
    for file in &files {
        let me = module_of(file);
        let text = read(file);
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut deps = Vec::new();
        let add = |deps: &mut Vec<String>, module: String| {
            if module != me && module != "lib" && !deps.contains(&module) {
                deps.push(module);
            }
        };
        for line in text.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            let line = line
                .strip_prefix("pub(crate) ")
                .or_else(|| line.strip_prefix("pub "))
                .unwrap_or(line);
            // A parent contains the children it declares: `mod x;` is an arrow down to it.
            if let Some(child) = line.strip_prefix("mod ").and_then(|l| l.strip_suffix(';')) {
                let child = if me == "lib" || me == "main" {
                    child.to_owned()
                } else {
                    format!("{me}::{child}")
                };
                if modules.contains(&child) {
                    add(&mut deps, child);
                }
                continue;
            }
            // Paths written inline (`crate::agent::State`) count like `use` lines.
            for (at, _) in line.match_indices("crate::") {
                let preceded = line[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_');
                if preceded {
                    continue;
                }
                let rest: String = line[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let mut parts: Vec<String> = rest
                    .split("::")
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect();
                while !parts.is_empty() {
                    let candidate = parts.join("::");
                    if modules.contains(&candidate) {
                        add(&mut deps, candidate);
                        break;
                    }
                    parts.pop();
                }
            }
            let Some(path) = line.strip_prefix("use ") else {
                continue;
            };
            let mut parts: Vec<String> = if let Some(rest) = path.strip_prefix("crate::") {
                rest.split("::").map(str::to_owned).collect()
            } else if let Some(rest) = path.strip_prefix("super::") {
                let mut base: Vec<String> = me.split("::").map(str::to_owned).collect();
                base.pop();
                base.extend(rest.split("::").map(str::to_owned));
                base
            } else {
                continue;
            };
            // `use crate::a::{b, c}`: the longest prefix that names a module.
            let parts_clean: Vec<String> = parts
                .iter()
                .map(|p| {
                    p.chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect()
                })
                .collect();
            parts = parts_clean;
            while !parts.is_empty() {
                let candidate = parts.join("::");
                if modules.contains(&candidate) {
                    add(&mut deps, candidate);
                    break;
                }
                parts.pop();
            }
        }
        graph.insert(me, deps);
    }
    graph
}

/// Every loop in `graph`, each as the modules around it.
fn find_cycles(graph: &std::collections::BTreeMap<String, Vec<String>>) -> Vec<Vec<String>> {
    fn visit(
        node: &str,
        graph: &std::collections::BTreeMap<String, Vec<String>>,
        state: &mut std::collections::BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        cycles: &mut Vec<Vec<String>>,
    ) {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = stack.iter().position(|m| m == next).unwrap_or(0);
                    cycles.push(stack[start..].to_vec());
                }
                None => visit(next, graph, state, stack, cycles),
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
    }
    let mut state = std::collections::BTreeMap::new();
    let mut cycles = Vec::new();
    for node in graph.keys() {
        if !state.contains_key(node.as_str()) {
            visit(node, graph, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    cycles
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn relative(path: &Path) -> String {
    path.strip_prefix(project_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every `.rs` file below `dir`, skipping build output, VCS data and hidden directories.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    pending.push(path);
                }
            } else if name.ends_with(".rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The `members` of the root `Cargo.toml`, read without a TOML parser.
fn workspace_members() -> Vec<String> {
    let manifest = read(&project_root().join("Cargo.toml"));
    let start = manifest
        .find("members")
        .expect("no `members` in the root Cargo.toml");
    let list = &manifest[start..];
    let list = &list[list.find('[').unwrap() + 1..list.find(']').unwrap()];
    let members: Vec<String> = list
        .split(',')
        .map(|item| item.trim().trim_matches('"').to_owned())
        .filter(|item| !item.is_empty())
        .collect();
    assert!(!members.is_empty(), "could not read workspace members");
    members
}

/// Names of runtime crates among the normal and build dependencies of a manifest: table keys
/// (`tokio = …`, `tokio.workspace = …`, `[dependencies.tokio]`) and renames
/// (`package = "tokio"`). Dev-dependencies are allowed.
fn runtime_dependencies(manifest: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_dependencies = false;
    for line in manifest.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_end_matches(']');
            let (table, key) = match header.rsplit_once("dependencies") {
                Some((before, after)) => (before, after.trim_start_matches('.')),
                None => ("", ""),
            };
            let is_dependencies = header.contains("dependencies") && !table.ends_with("dev-");
            in_dependencies = is_dependencies && key.is_empty();
            if is_dependencies && RUNTIME_CRATES.contains(&key) {
                found.push(key.to_owned());
            }
            continue;
        }
        if !in_dependencies || line.starts_with('#') {
            continue;
        }
        let key = line.split(['=', '.']).next().unwrap_or("").trim();
        let renamed = RUNTIME_CRATES
            .iter()
            .find(|name| line.contains(&format!("package = \"{name}\"")));
        if let Some(name) = renamed {
            found.push((*name).to_owned());
        } else if RUNTIME_CRATES.contains(&key) {
            found.push(key.to_owned());
        }
    }
    found
}
