//! `cargo xtask bench`: builds and runs the `cache-bench` binary, which measures every
//! scenario against its baselines in one run and writes `target/bench/report.md` and
//! `target/bench/report.json`, and prints the table.
//!
//! - `--quick`: a reduced run (under 2 minutes);
//! - `--debug`: a debug build (only to prove it runs; figures mean nothing); `cargo xtask
//!   test` never runs this command, `cargo test -p cache-bench` runs every scenario in smoke
//!   mode instead;
//! - `--only a,b`: only these scenarios;
//! - `--save`: also copy the table into `BENCHMARKS.md`, between its markers;
//! - `--profile-hit SECS [--threads N]`: no report, only our hit loop (polled, 10 k warm
//!   entries) for SECS seconds on N threads, printing ns/op: a quick figure while iterating on
//!   the hit path, and a target for `perf record` / `valgrind --tool=callgrind` on
//!   `target/release/cache-bench --profile-hit SECS`. For one scenario with its baselines,
//!   `--only hit` (add `--quick` for fewer rounds).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

pub(crate) fn run(root: &Path, args: &[&str]) -> ExitCode {
    let mut quick = false;
    let mut debug = false;
    let mut save = false;
    let mut only = None;
    let mut profile: Option<&str> = None;
    let mut threads: Option<&str> = None;
    let mut rest = args.iter();
    while let Some(&arg) = rest.next() {
        match arg {
            "--quick" => quick = true,
            "--debug" => debug = true,
            "--save" => save = true,
            "--only" => match rest.next() {
                Some(list) => only = Some(*list),
                None => return usage("--only needs a value"),
            },
            "--profile-hit" => match rest.next() {
                Some(secs) if secs.parse::<u64>().is_ok() => profile = Some(*secs),
                _ => return usage("--profile-hit needs a number of seconds"),
            },
            "--threads" => match rest.next() {
                Some(n) if n.parse::<usize>().is_ok_and(|n| n > 0) => threads = Some(*n),
                _ => return usage("--threads needs a positive number"),
            },
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    if threads.is_some() && profile.is_none() {
        return usage("--threads goes with --profile-hit");
    }

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| root.join(dir))
        .unwrap_or_else(|| root.join("target"));
    let out = target.join("bench");
    let recorded = std::iter::once("cargo xtask bench")
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");

    let mut cargo = Command::new(crate::cargo());
    cargo.current_dir(root).args([
        "run",
        "--quiet",
        "--package",
        "cache-bench",
        "--bin",
        "cache-bench",
    ]);
    if !debug {
        cargo.arg("--release");
    }
    if let Some(secs) = profile {
        cargo.args(["--", "--profile-hit", secs]);
        if let Some(n) = threads {
            cargo.args(["--threads", n]);
        }
        eprintln!("==> {recorded}");
        return match cargo.status() {
            Ok(status) if status.success() => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        };
    }
    cargo
        .arg("--")
        .arg("--out")
        .arg(&out)
        .args(["--command", &recorded]);
    if quick {
        cargo.arg("--quick");
    }
    if let Some(only) = only {
        cargo.args(["--only", only]);
    }
    eprintln!("==> {recorded}");
    match cargo.status() {
        Ok(status) if status.success() => {}
        Ok(status) => {
            eprintln!("cargo xtask bench: cache-bench failed: {status}");
            return ExitCode::FAILURE;
        }
        Err(error) => {
            eprintln!("cargo xtask bench: could not run cargo: {error}");
            return ExitCode::FAILURE;
        }
    }
    if save {
        if let Err(error) = save_table(root, &out.join("report.md")) {
            eprintln!("cargo xtask bench --save: {error}");
            return ExitCode::FAILURE;
        }
        eprintln!("BENCHMARKS.md updated");
    }
    ExitCode::SUCCESS
}

/// Replaces the text between the markers of `BENCHMARKS.md` with the report.
fn save_table(root: &Path, report: &Path) -> Result<(), String> {
    let path = root.join("BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let table =
        std::fs::read_to_string(report).map_err(|e| format!("{}: {e}", report.display()))?;
    let updated = splice(&doc, &table)
        .ok_or_else(|| format!("{} lacks the markers {BEGIN} … {END}", path.display()))?;
    std::fs::write(&path, updated).map_err(|e| format!("{}: {e}", path.display()))
}

/// `doc` with the text between the markers replaced by `table`.
fn splice(doc: &str, table: &str) -> Option<String> {
    let start = doc.find(BEGIN)? + BEGIN.len();
    let end = start + doc[start..].find(END)?;
    Some(format!(
        "{}\n{}\n{}",
        &doc[..start],
        table.trim_end(),
        &doc[end..]
    ))
}

fn usage(error: &str) -> ExitCode {
    eprintln!(
        "error: {error}\n\nusage: cargo xtask bench [--quick] [--debug] [--only SCENARIO,…] [--save]\n\
         \x20      cargo xtask bench --profile-hit SECS [--threads N] [--debug]"
    );
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_marked_region() {
        let doc = format!("intro\n{BEGIN}\nold\n{END}\nafter\n");
        let out = splice(&doc, "new table\n").unwrap();
        assert_eq!(out, format!("intro\n{BEGIN}\nnew table\n{END}\nafter\n"));
        assert!(splice("no markers", "x").is_none());
    }
}
