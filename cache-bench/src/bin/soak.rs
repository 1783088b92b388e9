//! `soak`: the engine under a long mixed load on tokio, failing if memory, entries, watches or
//! tasks grow without bound. Normally started by `cargo xtask soak [--secs N]` (release build).
//! See `cache_bench::soak` for the load and the verdict.

use std::process::ExitCode;

use cache_bench::soak::{Config, run};

const HELP: &str = "\
soak [--secs N] [--keys-per-sec N] [--failing-per-sec N]

  --secs N             how long the load runs (default 120); a sample every N/24 s (0.2 to 5 s)
  --keys-per-sec N     new churned keys a second, in steps of 100 (default 10000; 0: none)
  --failing-per-sec N  new failing keys a second, in steps of 100 (default 2000; 0: none)
";

fn main() -> ExitCode {
    let mut secs = 120;
    let mut keys = None;
    let mut failing = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--secs" => match args.next().and_then(|s| s.parse().ok()) {
                Some(n) if n > 0 => secs = n,
                _ => return usage("--secs needs a positive number of seconds"),
            },
            "--keys-per-sec" => match args.next().and_then(|s| s.parse::<usize>().ok()) {
                Some(n) => keys = Some(n),
                None => return usage("--keys-per-sec needs a number"),
            },
            "--failing-per-sec" => match args.next().and_then(|s| s.parse::<usize>().ok()) {
                Some(n) => failing = Some(n),
                None => return usage("--failing-per-sec needs a number"),
            },
            "-h" | "--help" => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let mut config = Config::new(secs);
    // The load runs in 10 ms ticks.
    if let Some(n) = keys {
        config.churn_per_tick = n / 100;
    }
    if let Some(n) = failing {
        config.failing_per_tick = n / 100;
    }
    let report = run(&config);
    if let Some(verdicts) = &report.verdicts {
        println!(
            "growth (median of the last third against the second third, limit +10 % + slack):"
        );
        for v in verdicts {
            println!(
                "  {:<10} second {:>14.0}  last {:>14.0}  limit {:>14.0}  {}",
                v.quantity,
                v.second,
                v.last,
                v.limit,
                if v.grew() { "GROWS" } else { "bounded" }
            );
        }
    }
    let failures = report.failures();
    if failures.is_empty() {
        println!("soak: PASSED");
        ExitCode::SUCCESS
    } else {
        for failure in &failures {
            println!("soak: FAILED: {failure}");
        }
        ExitCode::FAILURE
    }
}

fn usage(error: &str) -> ExitCode {
    eprintln!("error: {error}\n\n{HELP}");
    ExitCode::from(2)
}
