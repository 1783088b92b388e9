//! Figures and the report: a Markdown table (`report.md`) and one JSON object per figure
//! (`report.json`: `name`, `median`, `unit`, `baseline`, `ratio`, and context fields).

use std::fmt::Write as _;

use serde_json::{Value, json};

/// What a figure must reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// ours ÷ baseline at most this.
    RatioAtMost(f64),
    /// ours ÷ baseline at least this (throughputs).
    RatioAtLeast(f64),
    /// The median itself at most this, in the figure's unit.
    AtMost(f64),
    /// The median exactly this (counts).
    Exactly(f64),
}

impl Goal {
    fn describe(&self, unit: &str) -> String {
        match *self {
            Goal::RatioAtMost(x) => format!("≤ {x}×"),
            Goal::RatioAtLeast(x) => format!("≥ {x}×"),
            Goal::AtMost(x) => format!("≤ {} {unit}", num(x)),
            Goal::Exactly(x) => format!("= {}", num(x)),
        }
    }
}

/// One measured figure, with its baseline from the same run.
#[derive(Debug, Clone)]
pub struct Figure {
    /// `scenario/what`, unique in a report.
    pub name: String,
    /// The median over rounds.
    pub median: f64,
    /// The 99th percentile over rounds (or over events, as the note says), where it means
    /// something.
    pub p99: Option<f64>,
    /// `ns/op`, `ms`, `B/entry`, `req/s`, …
    pub unit: &'static str,
    /// What the baseline is.
    pub baseline_name: Option<String>,
    /// The baseline's median in the same unit.
    pub baseline: Option<f64>,
    /// The baseline's p99, where `p99` is set.
    pub baseline_p99: Option<f64>,
    /// The goal, if the issue sets one.
    pub goal: Option<Goal>,
    /// How it was measured, in a few words.
    pub note: String,
}

impl Figure {
    /// A figure with no baseline yet.
    pub fn new(name: impl Into<String>, median: f64, unit: &'static str) -> Self {
        Self {
            name: name.into(),
            median,
            p99: None,
            unit,
            baseline_name: None,
            baseline: None,
            baseline_p99: None,
            goal: None,
            note: String::new(),
        }
    }

    /// Sets the baseline.
    pub fn baseline(mut self, name: impl Into<String>, median: f64) -> Self {
        self.baseline_name = Some(name.into());
        self.baseline = Some(median);
        self
    }

    /// Sets the p99s (ours, baseline's).
    pub fn p99(mut self, ours: f64, baseline: Option<f64>) -> Self {
        self.p99 = Some(ours);
        self.baseline_p99 = baseline;
        self
    }

    /// Sets the goal.
    pub fn goal(mut self, goal: Goal) -> Self {
        self.goal = Some(goal);
        self
    }

    /// Sets the note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    /// ours ÷ baseline.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .filter(|b| *b != 0.0 && b.is_finite())
            .map(|b| self.median / b)
    }

    /// Whether the goal is met (`None` without a goal, or without the baseline it needs).
    pub fn met(&self) -> Option<bool> {
        Some(match self.goal? {
            Goal::RatioAtMost(x) => self.ratio()? <= x,
            Goal::RatioAtLeast(x) => self.ratio()? >= x,
            Goal::AtMost(x) => self.median <= x,
            Goal::Exactly(x) => self.median == x,
        })
    }

    /// The figure as one line of progress output.
    pub fn one_line(&self) -> String {
        let mut line = format!("{}: {} {}", self.name, num(self.median), self.unit);
        if let (Some(name), Some(b)) = (&self.baseline_name, self.baseline) {
            let _ = write!(line, " | {name}: {} {}", num(b), self.unit);
        }
        if let Some(r) = self.ratio() {
            let _ = write!(line, " | {r:.2}×");
        }
        if let Some(met) = self.met() {
            line += if met { " | goal met" } else { " | goal MISSED" };
        }
        line
    }

    /// The figure as a JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "median": finite(self.median),
            "unit": self.unit,
            "baseline": self.baseline.map(finite),
            "ratio": self.ratio().map(finite),
            "p99": self.p99.map(finite),
            "baseline_name": self.baseline_name,
            "baseline_p99": self.baseline_p99.map(finite),
            "goal": self.goal.map(|g| g.describe(self.unit)),
            "met": self.met(),
            "note": self.note,
        })
    }
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

/// A number with as many digits as are worth reading.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        "—".to_owned()
    } else if x.abs() >= 1000.0 {
        let int = format!("{:.0}", x.abs());
        let mut out = String::new();
        for (i, c) in int.chars().enumerate() {
            if i > 0 && (int.len() - i) % 3 == 0 {
                out.push(' ');
            }
            out.push(c);
        }
        if x < 0.0 { format!("-{out}") } else { out }
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn with_p99(median: f64, p99: Option<f64>) -> String {
    match p99 {
        Some(p) => format!("{} (p99 {})", num(median), num(p)),
        None => num(median),
    }
}

/// Where and how the figures were taken.
#[derive(Debug, Clone)]
pub struct Machine {
    /// `nproc`.
    pub cpus: usize,
    /// The model name from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// `rustc -V`.
    pub rustc: String,
    /// The command that produced the report.
    pub command: String,
    /// `full`, `quick` or `smoke`, and the build profile.
    pub mode: String,
    /// The date, UTC.
    pub date: String,
    /// `git describe`-like: the commit measured, `+dirty` when the tree had changes.
    pub commit: String,
}

impl Machine {
    /// This machine, now.
    pub fn detect(command: String, mode: String) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let rustc = std::process::Command::new(std::env::var("RUSTC").unwrap_or("rustc".into()))
            .arg("-V")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            rustc,
            command,
            mode,
            date: today(),
            commit: commit(),
        }
    }
}

/// The checked-out commit, `+dirty` if tracked files differ from it; `unknown` outside git.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(hash) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.trim().is_empty());
            format!("{}{}", hash.trim(), if dirty { "+dirty" } else { "" })
        }
        None => "unknown".to_owned(),
    }
}

/// Today's date (UTC) as `YYYY-MM-DD`, from the system clock.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Howard Hinnant's civil_from_days.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The report as Markdown: the machine, then one table row per figure, then the notes.
pub fn markdown(machine: &Machine, figures: &[Figure]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Machine: {} CPUs ({}); {}; commit {}; {} ({}).\n",
        machine.cpus, machine.cpu_model, machine.rustc, machine.commit, machine.date, machine.mode
    );
    let _ = writeln!(out, "Command: `{}`\n", machine.command);
    out += "| figure | ours | unit | baseline | baseline value | ratio | goal | met |\n";
    out += "|---|---:|---|---|---:|---:|---|---|\n";
    for f in figures {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            f.name,
            with_p99(f.median, f.p99),
            f.unit,
            f.baseline_name.as_deref().unwrap_or("—"),
            f.baseline
                .map_or("—".to_owned(), |b| with_p99(b, f.baseline_p99)),
            f.ratio().map_or("—".to_owned(), |r| format!("{r:.2}×")),
            f.goal.map_or("—".to_owned(), |g| g.describe(f.unit)),
            match f.met() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            },
        );
    }
    out += "\nNotes:\n\n";
    for f in figures.iter().filter(|f| !f.note.is_empty()) {
        let _ = writeln!(out, "- `{}`: {}", f.name, f.note);
    }
    out
}

/// The report as JSON: the machine and one object per figure.
pub fn json(machine: &Machine, figures: &[Figure]) -> Value {
    json!({
        "machine": {
            "cpus": machine.cpus,
            "cpu_model": machine.cpu_model,
            "rustc": machine.rustc,
            "command": machine.command,
            "mode": machine.mode,
            "date": machine.date,
            "commit": machine.commit,
        },
        "figures": figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_goal_and_formatting() {
        let f = Figure::new("hit/x", 40.0, "ns/op")
            .baseline("map", 37.0)
            .goal(Goal::RatioAtMost(1.2));
        assert!((f.ratio().unwrap() - 40.0 / 37.0).abs() < 1e-9);
        assert_eq!(f.met(), Some(true));
        let j = f.to_json();
        for key in ["name", "median", "unit", "baseline", "ratio"] {
            assert!(j.get(key).is_some(), "{key}");
        }
        assert_eq!(num(1_234_567.0), "1 234 567");
        assert_eq!(num(0.5), "0.50");
        assert_eq!(today().len(), 10);
        let no_goal = Figure::new("x", 1.0, "ms");
        assert_eq!(no_goal.met(), None);
    }
}
