//! `cargo xtask test`: the whole matrix. Every step runs even if an earlier one failed, so one
//! run reports everything that is wrong; the exit code is non-zero if any step failed.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use crate::matrix::PACKAGES;

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed,
    Skipped(&'static str),
}

#[derive(Debug)]
struct Step {
    name: String,
    outcome: Outcome,
    took: Duration,
}

pub(crate) fn run(root: &Path) -> ExitCode {
    let mut steps = Vec::new();

    steps.push(run_cargo(
        root,
        "fmt",
        &["fmt", "--all", "--", "--check"],
        &[],
    ));
    steps.push(run_cargo(
        root,
        "clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    ));
    for row in PACKAGES {
        let name = format!("test {}", row.package);
        if row.only_if_present && !root.join(row.package).join("Cargo.toml").is_file() {
            steps.push(Step {
                name,
                outcome: Outcome::Skipped("not present"),
                took: Duration::ZERO,
            });
            continue;
        }
        steps.push(run_cargo(root, &name, &["test", "-p", row.package], &[]));
    }
    steps.push(run_cargo(
        root,
        "doc",
        &["doc", "--workspace", "--no-deps"],
        &[("RUSTDOCFLAGS", "-Dwarnings")],
    ));

    print!("{}", report(&steps));
    if steps.iter().any(|step| step.outcome == Outcome::Failed) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs `cargo <args>` in the workspace root with inherited stdio and records the outcome.
fn run_cargo(root: &Path, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Step {
    let cargo = crate::cargo();
    eprintln!("\n==> [{name}] {cargo} {}", args.join(" "));
    let start = Instant::now();
    let status = Command::new(&cargo)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(root)
        .status();
    let outcome = match status {
        Ok(status) if status.success() => Outcome::Passed,
        Ok(status) => {
            eprintln!("==> [{name}] failed: {status}");
            Outcome::Failed
        }
        Err(error) => {
            eprintln!("==> [{name}] could not run {cargo}: {error}");
            Outcome::Failed
        }
    };
    Step {
        name: name.to_owned(),
        outcome,
        took: start.elapsed(),
    }
}

/// The per-step table, ending with exactly one `N passed, N failed` line.
fn report(steps: &[Step]) -> String {
    let width = steps.iter().map(|step| step.name.len()).max().unwrap_or(0);
    let mut out = String::from("\n");
    let (mut passed, mut failed) = (0, 0);
    for step in steps {
        let result = match step.outcome {
            Outcome::Passed => {
                passed += 1;
                "pass".to_owned()
            }
            Outcome::Failed => {
                failed += 1;
                "FAIL".to_owned()
            }
            Outcome::Skipped(why) => format!("skip ({why})"),
        };
        let secs = step.took.as_secs_f64();
        out += &format!("{:<width$}  {result:<20} {secs:>7.1}s\n", step.name);
    }
    out += &format!("{passed} passed, {failed} failed\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, outcome: Outcome) -> Step {
        Step {
            name: name.to_owned(),
            outcome,
            took: Duration::from_millis(1500),
        }
    }

    #[test]
    fn report_counts_steps_and_ends_with_the_summary_line() {
        let steps = [
            step("fmt", Outcome::Passed),
            step("test demo-agent", Outcome::Skipped("not present")),
            step("clippy", Outcome::Failed),
            step("doc", Outcome::Passed),
        ];
        let report = report(&steps);
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines.last(), Some(&"2 passed, 1 failed"));
        assert_eq!(report.matches(" passed, ").count(), 1);
        assert!(
            lines
                .iter()
                .any(|line| line.starts_with("clippy ") && line.contains("FAIL"))
        );
        assert!(lines.iter().any(|line| line.contains("skip (not present)")));
    }
}
