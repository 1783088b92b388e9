//! `cache-bench`: runs the benchmark scenarios and writes `report.md` and `report.json`.
//! Normally started by `cargo xtask bench`, which builds it in release mode.

use std::path::PathBuf;
use std::process::ExitCode;

use cache_bench::{Mode, SCENARIOS, report};

const HELP: &str = "\
cache-bench [--quick | --smoke] [--only SCENARIO[,SCENARIO…]] [--out DIR] [--command TEXT]

  --quick      a reduced run (under 2 minutes in a release build)
  --smoke      tiny counts: proves every scenario runs; figures mean nothing
  --only       run only these scenarios (hit, many, churn, storm, fanout, runtimes, agent…)
  --out        where report.md and report.json go (default: target/bench)
  --command    the command line to record in the report
  --profile-hit SECS   run only one hit loop for SECS seconds (for perf), no report: ours, or
                       the baseline CACHE_BENCH_PROFILE_VARIANT names (map, dash, moka)
  --threads N          with --profile-hit: on N threads at once (default 1);
                       CACHE_BENCH_PROFILE_DRIVE=task awaits in N tokio tasks instead
";

fn main() -> ExitCode {
    let mut mode = Mode::Full;
    let mut only = Vec::new();
    let mut out = PathBuf::from("target/bench");
    let mut command = None;
    let mut profile_secs: Option<u64> = None;
    let mut threads = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => mode = Mode::Quick,
            "--smoke" => mode = Mode::Smoke,
            "--only" => match args.next() {
                Some(list) => only.extend(list.split(',').map(str::to_owned)),
                None => return usage("--only needs a value"),
            },
            "--out" => match args.next() {
                Some(dir) => out = PathBuf::from(dir),
                None => return usage("--out needs a value"),
            },
            "--command" => command = args.next(),
            "--profile-hit" => match args.next().and_then(|s| s.parse().ok()) {
                Some(secs) => profile_secs = Some(secs),
                None => return usage("--profile-hit needs a number of seconds"),
            },
            "--threads" => match args.next().and_then(|s| s.parse().ok()) {
                Some(n) if n > 0 => threads = n,
                _ => return usage("--threads needs a positive number"),
            },
            "-h" | "--help" => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    if let Some(secs) = profile_secs {
        // One hit loop alone, for `perf record`: ours or the baseline the environment names.
        cache_bench::scenarios::hit::profile(std::time::Duration::from_secs(secs), threads);
        return ExitCode::SUCCESS;
    }
    if let Some(bad) = only.iter().find(|o| !SCENARIOS.contains(&o.as_str())) {
        return usage(&format!("unknown scenario {bad:?}"));
    }
    if std::env::var_os("SMOL_THREADS").is_none() {
        // smol's global executor runs one thread by default; give it one per CPU like the
        // others. SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("SMOL_THREADS", cache_bench::rt::cpus().to_string()) };
    }

    let figures = cache_bench::run(mode, &only);

    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mode_name = match mode {
        Mode::Full => "full",
        Mode::Quick => "quick",
        Mode::Smoke => "smoke",
    };
    let command = command.unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let machine = report::Machine::detect(command, format!("{mode_name}, {profile} build"));
    let md = report::markdown(&machine, &figures);
    let json = report::json(&machine, &figures);
    if let Err(error) = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join("report.md"), &md))
        .and_then(|()| {
            std::fs::write(
                out.join("report.json"),
                serde_json::to_string_pretty(&json).expect("json") + "\n",
            )
        })
    {
        eprintln!("error: writing the report to {}: {error}", out.display());
        return ExitCode::FAILURE;
    }
    println!("{md}");
    eprintln!("report: {}", out.join("report.md").display());
    ExitCode::SUCCESS
}

fn usage(error: &str) -> ExitCode {
    eprintln!("error: {error}\n\n{HELP}");
    ExitCode::from(2)
}
