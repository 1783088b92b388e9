//! `cargo xtask bench`: the benchmark report. Not part of `cargo xtask test`.

use std::process::ExitCode;

pub(crate) fn run() -> ExitCode {
    eprintln!("cargo xtask bench: not yet implemented");
    ExitCode::from(2)
}
