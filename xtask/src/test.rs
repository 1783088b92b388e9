//! `cargo xtask test`: the whole matrix. Every step runs even if an earlier one failed, so one
//! run reports everything that is wrong; the exit code is non-zero if any step failed.
//!
//! The demo agent's etcd tests need an `etcd` binary. Without one they print `SKIP` and pass,
//! so this command says so loudly, before and after the run, naming every skipped test and how
//! to install etcd (`.ci/run` installs it and sets `DEMO_AGENT_REQUIRE_ETCD=1`, which turns a
//! missing binary into a failure).

use std::path::{Path, PathBuf};
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
    let etcd_skipped = if etcd_binary().is_some() {
        Vec::new()
    } else {
        etcd_tests(root)
    };
    if !etcd_skipped.is_empty() {
        eprint!("{}", etcd_notice(&etcd_skipped));
    }
    let mut clients_skipped = Vec::new();
    if !client_python(root) {
        clients_skipped.extend(client_tests(root, "py_consul"));
    }
    if !client_node(root) {
        clients_skipped.extend(client_tests(root, "npm_consul"));
    }
    if !clients_skipped.is_empty() {
        eprint!("{}", clients_notice(&clients_skipped));
    }
    let browser_skipped = if browser_binaries() {
        Vec::new()
    } else {
        browser_tests(root)
    };
    if !browser_skipped.is_empty() {
        eprint!("{}", browser_notice(&browser_skipped));
    }

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
        steps.push(run_cargo(root, &name, &["test", "-p", row.package], &[]));
    }
    steps.push(run_cargo(
        root,
        "doc",
        &["doc", "--workspace", "--no-deps"],
        &[("RUSTDOCFLAGS", "-Dwarnings")],
    ));

    if !etcd_skipped.is_empty() {
        steps.push(Step {
            name: format!("etcd tests ({})", etcd_skipped.len()),
            outcome: Outcome::Skipped("no etcd on PATH"),
            took: Duration::ZERO,
        });
    }
    if !clients_skipped.is_empty() {
        steps.push(Step {
            name: format!("Consul client tests ({})", clients_skipped.len()),
            outcome: Outcome::Skipped("no py-consul or npm consul client"),
            took: Duration::ZERO,
        });
    }
    if !browser_skipped.is_empty() {
        steps.push(Step {
            name: format!("browser tests ({})", browser_skipped.len()),
            outcome: Outcome::Skipped("no chromium/chromedriver"),
            took: Duration::ZERO,
        });
    }
    print!("{}", report(&steps));
    if !etcd_skipped.is_empty() {
        print!("{}", etcd_notice(&etcd_skipped));
    }
    if !clients_skipped.is_empty() {
        print!("{}", clients_notice(&clients_skipped));
    }
    if !browser_skipped.is_empty() {
        print!("{}", browser_notice(&browser_skipped));
    }
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

/// Whether the demo agent's Consul client tests find their client: a python that can import
/// py-consul, `$DEMO_AGENT_CLIENT_PYTHON` or `target/client-venv/bin/python` (the lookup of
/// `demo-agent/tests/consul_clients.rs`).
fn client_python(root: &Path) -> bool {
    let python = std::env::var_os("DEMO_AGENT_CLIENT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/client-venv/bin/python"));
    Command::new(python)
        .args(["-c", "import consul"])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Whether `node` loads the npm `consul` client from `$DEMO_AGENT_CLIENT_NODE_PATH` or
/// `target/client-npm/node_modules` (the lookup of `demo-agent/tests/consul_clients.rs`).
fn client_node(root: &Path) -> bool {
    let node_path = std::env::var_os("DEMO_AGENT_CLIENT_NODE_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/client-npm/node_modules"));
    Command::new("node")
        .args(["-e", "require('consul')"])
        .env("NODE_PATH", node_path)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// The tests that skip without a client: every `CHECK("NAME")` (`py_consul`, `npm_consul`)
/// in `demo-agent/tests/consul_clients.rs`.
fn client_tests(root: &Path, check: &str) -> Vec<String> {
    let call = format!("{check}(\"");
    let text = std::fs::read_to_string(root.join("demo-agent/tests/consul_clients.rs"))
        .unwrap_or_default();
    text.match_indices(&call)
        .filter_map(|(at, _)| {
            let rest = &text[at + call.len()..];
            rest.find('"').map(|end| rest[..end].to_owned())
        })
        .collect()
}

/// The loud notice printed when the Consul client tests are skipped.
fn clients_notice(skipped: &[String]) -> String {
    let rule = "!".repeat(78);
    let mut out = format!(
        "\n{rule}\n!! SKIPPED: {} demo-agent tests need a Consul client library and found none\n",
        skipped.len()
    );
    for name in skipped {
        out += &format!("!!   - {name}\n");
    }
    out += "!! To run them: python3 -m venv target/client-venv && \\\n";
    out += "!!   target/client-venv/bin/pip install py-consul==1.8.0   (what .ci/run does)\n";
    out += "!! and (node, npm) npm install --prefix target/client-npm consul@2.0.1\n";
    out += &format!("{rule}\n");
    out
}

/// A program named by `$var`, else the first of `names` on `PATH`.
fn program(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Whether the web view's browser tests find Chromium and chromedriver (the lookup of
/// `demo-agent/tests/ui_browser.rs`: `$CHROMIUM_BIN`/`$CHROMEDRIVER_BIN`, else `PATH`).
fn browser_binaries() -> bool {
    program("CHROMIUM_BIN", &["chromium", "chromium-browser"]).is_some()
        && program("CHROMEDRIVER_BIN", &["chromedriver"]).is_some()
}

/// The tests that skip without a browser: every `browser::available("NAME")` in
/// `demo-agent/tests/ui_browser.rs`.
fn browser_tests(root: &Path) -> Vec<String> {
    const CALL: &str = "browser::available(\"";
    let text =
        std::fs::read_to_string(root.join("demo-agent/tests/ui_browser.rs")).unwrap_or_default();
    text.match_indices(CALL)
        .filter_map(|(at, _)| {
            let rest = &text[at + CALL.len()..];
            rest.find('"').map(|end| rest[..end].to_owned())
        })
        .collect()
}

/// The loud notice printed when the browser tests are skipped.
fn browser_notice(skipped: &[String]) -> String {
    let rule = "!".repeat(78);
    let mut out = format!(
        "\n{rule}\n!! SKIPPED: {} demo-agent tests need chromium and chromedriver and found them not\n",
        skipped.len()
    );
    for name in skipped {
        out += &format!("!!   ui_browser: {name}\n");
    }
    out += "!! They printed SKIP and passed without testing anything. To run them:\n";
    out += "!!   sudo apt-get install -y chromium chromium-driver    (Debian; what .ci/run does)\n";
    out += "!!   or CHROMIUM_BIN=... CHROMEDRIVER_BIN=... cargo xtask test\n";
    out += &format!("{rule}\n");
    out
}

/// The etcd binary the demo agent's tests would use: `$ETCD_BIN`, else `etcd` on `PATH`
/// (the same lookup as `demo-agent/tests/common/etcd.rs`).
fn etcd_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ETCD_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
}

/// The tests that skip without etcd: every `etcd::available("NAME")` in
/// `demo-agent/tests/*.rs`, as `file: NAME`.
fn etcd_tests(root: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(root.join("demo-agent/tests")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = dir
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .collect();
    files.sort();
    let mut tests = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let stem = file.file_stem().unwrap_or_default().to_string_lossy();
        tests.extend(
            etcd_test_names(&text)
                .into_iter()
                .map(|name| format!("{stem}: {name}")),
        );
    }
    tests
}

/// The names passed to `etcd::available("...")` in a test file.
fn etcd_test_names(text: &str) -> Vec<String> {
    const CALL: &str = "etcd::available(\"";
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(CALL) {
        rest = &rest[at + CALL.len()..];
        if let Some(end) = rest.find('"') {
            names.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    names
}

/// The loud notice printed when the etcd tests are skipped.
fn etcd_notice(skipped: &[String]) -> String {
    let rule = "!".repeat(78);
    let mut out = format!(
        "\n{rule}\n!! SKIPPED: {} demo-agent tests need an `etcd` binary and found none on PATH\n",
        skipped.len()
    );
    for test in skipped {
        out += &format!("!!   {test}\n");
    }
    out += "!! They printed SKIP and passed without testing anything. To run them:\n";
    out += "!!   sudo apt-get install -y etcd-server    (Debian/Ubuntu; etcd 3.4+)\n";
    out += "!!   or ETCD_BIN=/path/to/etcd cargo xtask test\n";
    out += &format!("{rule}\n");
    out
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

    #[test]
    fn finds_the_etcd_tests_and_names_them_in_the_notice() {
        let file = r#"
#[tokio::test]
async fn parity_etcd() {
    if !etcd::available("parity_etcd") {
        return;
    }
}
async fn other() { if !etcd::available("member_loss") { return; } }
"#;
        assert_eq!(etcd_test_names(file), ["parity_etcd", "member_loss"]);
        let notice = etcd_notice(&["etcd_parity: parity_etcd".to_owned()]);
        assert!(notice.contains("SKIPPED: 1 demo-agent tests"));
        assert!(notice.contains("etcd_parity: parity_etcd"));
        assert!(notice.contains("apt-get install -y etcd-server"));
        // The real tests are found (this crate's tests run from the workspace).
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let browser = browser_tests(root);
        assert!(browser.iter().any(|t| t.contains("outage")), "{browser:?}");
        assert!(browser_notice(&browser).contains("chromium-driver"));
        let found = etcd_tests(root);
        assert!(
            found.iter().any(|t| t.starts_with("etcd_parity: ")),
            "{found:?}"
        );
    }
}
