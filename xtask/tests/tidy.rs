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
