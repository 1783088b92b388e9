//! The benchmark suite behind `cargo xtask bench`: cache-core measured side by side with the
//! alternatives a user would pick, in the same process and the same run, so that every figure
//! is a ratio that survives a noisy machine.
//!
//! A hand-rolled harness (no criterion, to keep `cargo test -p cache-bench` light): each
//! scenario runs its variants in interleaved rounds (ours, baseline, baseline, ours, …), and a
//! figure is the median of its rounds; the ratio is ours ÷ baseline.
//!
//! - [`scenarios`]: hit path, many entries, churn through a capacity bound, miss storm, watch
//!   fan-out, runtimes, agent HTTP; [`REGISTRY`] lists them.
//! - [`soak`]: the long-running leak check behind `cargo xtask soak`.
//! - [`report`]: figures, the Markdown table and the JSON report.
//! - [`alloc`]: the counting global allocator (bytes live) and the process RSS.
//! - [`Mode`]: full, quick (`--quick`, under 2 minutes) and smoke (the `cargo test` run, tiny
//!   counts, never a timing assertion).
//!
//! The library installs [`alloc::Counting`] as the global allocator of every binary that
//! links it (the bench binary and its tests), so byte counts are exact.

pub mod alloc;
pub mod kv;
pub mod report;
pub mod rt;
pub mod scenarios;
pub mod soak;
pub mod stats;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// How much work each scenario does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The full suite: the sizes the issue asks for (1 M entries, 100 k watches, …).
    Full,
    /// A reduced suite that finishes in under 2 minutes in a release build.
    Quick,
    /// Tiny counts: only proves that every scenario runs (the smoke test, debug builds).
    Smoke,
}

impl Mode {
    /// Picks the value for this mode.
    pub fn pick<T>(self, full: T, quick: T, smoke: T) -> T {
        match self {
            Mode::Full => full,
            Mode::Quick => quick,
            Mode::Smoke => smoke,
        }
    }
}

/// A scenario: its name (what `--only` matches, and the prefix of its figures) and its entry
/// point.
pub type Scenario = (&'static str, fn(Mode) -> Vec<report::Figure>);

/// Every scenario, in report order. To add one, add a line here.
pub const REGISTRY: &[Scenario] = &[
    ("hit", scenarios::hit::run),
    ("many", scenarios::many::run),
    ("churn", scenarios::churn::run),
    ("storm", scenarios::storm::run),
    ("fanout", scenarios::fanout::run),
    ("runtimes", scenarios::runtimes::run),
    ("agent", scenarios::agent::run),
    ("etcd", scenarios::etcd::run),
];

/// The scenario names, in report order.
pub const SCENARIOS: &[&str] = &{
    let mut names = [""; REGISTRY.len()];
    let mut i = 0;
    while i < REGISTRY.len() {
        names[i] = REGISTRY[i].0;
        i += 1;
    }
    names
};

/// Runs the scenarios whose name is in `only` (all when `only` is empty) and returns their
/// figures. Progress goes to stderr.
pub fn run(mode: Mode, only: &[String]) -> Vec<report::Figure> {
    let mut figures = Vec::new();
    for &(name, scenario) in REGISTRY {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("== {name}");
        let started = std::time::Instant::now();
        let new = scenario(mode);
        for figure in &new {
            eprintln!("   {}", figure.one_line());
        }
        eprintln!("   ({:.1} s)", started.elapsed().as_secs_f64());
        figures.extend(new);
    }
    figures
}
