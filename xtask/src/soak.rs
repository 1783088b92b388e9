//! `cargo xtask soak [--secs N]`: builds the `soak` binary of `cache-bench` in release mode and
//! runs it: the engine under a long mixed load on a real tokio runtime (churn through a
//! capacity bound, failing keys, watches opened and dropped, closes, re-registrations, index
//! resets), sampled every few seconds. It fails, naming the quantity, if live bytes, entries,
//! watches or tasks grow without bound. Not part of `cargo xtask test`: it takes minutes.

use std::path::Path;
use std::process::{Command, ExitCode};

pub(crate) fn run(root: &Path, args: &[&str]) -> ExitCode {
    let mut secs = "120".to_owned();
    let mut debug = false;
    let mut load: Vec<&str> = Vec::new();
    let mut rest = args.iter();
    while let Some(&arg) = rest.next() {
        match arg {
            "--secs" => match rest.next() {
                Some(n) if n.parse::<u64>().is_ok_and(|n| n > 0) => secs = (*n).to_owned(),
                _ => return usage("--secs needs a positive number of seconds"),
            },
            "--debug" => debug = true,
            "--keys-per-sec" | "--failing-per-sec" => match rest.next() {
                Some(n) if n.parse::<usize>().is_ok() => load.extend([arg, *n]),
                _ => return usage(&format!("{arg} needs a number")),
            },
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let mut cargo = Command::new(crate::cargo());
    cargo.current_dir(root).args([
        "run",
        "--quiet",
        "--package",
        "cache-bench",
        "--bin",
        "soak",
    ]);
    if !debug {
        cargo.arg("--release");
    }
    cargo.args(["--", "--secs", &secs]).args(&load);
    eprintln!("==> cargo xtask soak --secs {secs}");
    match cargo.status() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("cargo xtask soak: FAILED ({status}); the lines above name what grew");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("cargo xtask soak: could not run cargo: {error}");
            ExitCode::FAILURE
        }
    }
}

fn usage(error: &str) -> ExitCode {
    eprintln!(
        "error: {error}\n\nusage: cargo xtask soak [--secs N] [--keys-per-sec N] \
         [--failing-per-sec N] [--debug]"
    );
    ExitCode::from(2)
}
