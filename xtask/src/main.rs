//! See <https://github.com/matklad/cargo-xtask/>.
//!
//! Project automation, run as `cargo xtask <command>` through the alias in `.cargo/config.toml`.
//! Parse the arguments, then a flat `match`; each command lives in its own module.

mod bench;
mod matrix;
mod soak;
mod test;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const HELP: &str = "\
cargo xtask <command>

Commands:
  test     the whole test matrix: fmt, clippy, `cargo test -p` per package, docs
  bench    the benchmark report: cache-core against its baselines, side by side
           [--quick] [--debug] [--only SCENARIO,…] [--save (into BENCHMARKS.md)]
           [--profile-hit SECS [--threads N]] (only our hit loop, for perf)
  soak     the engine under a long mixed load; fails if memory, entries, watches or
           tasks grow without bound (not part of `test`) [--secs N (default 120)]
           [--keys-per-sec N] [--failing-per-sec N] (the load; defaults 10000, 2000)
  help     print this message
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [] | ["help" | "--help" | "-h"] => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        ["test"] => test::run(&project_root()),
        ["bench", rest @ ..] => bench::run(&project_root(), rest),
        ["soak", rest @ ..] => soak::run(&project_root(), rest),
        _ => {
            eprintln!("error: unknown arguments {args:?}\n");
            eprint!("{HELP}");
            ExitCode::from(2)
        }
    }
}

/// The workspace root: the parent of this crate's directory.
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The cargo that invoked us (`CARGO`), so `cargo +toolchain xtask` stays on one toolchain.
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}
