//! Every scenario runs, with tiny counts, in whatever build `cargo test` makes (debug under
//! `cargo xtask test`). Asserts only that each one produces its figures and a well-formed
//! report, never a timing.

use cache_bench::report::{Machine, json, markdown};
use cache_bench::{Mode, SCENARIOS};

#[test]
fn every_scenario_runs_and_reports() {
    let figures = cache_bench::run(Mode::Smoke, &[]);
    for scenario in SCENARIOS {
        assert!(
            figures
                .iter()
                .any(|f| f.name.starts_with(&format!("{scenario}/"))),
            "scenario {scenario} produced no figure"
        );
    }
    let mut names: Vec<&str> = figures.iter().map(|f| f.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), figures.len(), "figure names must be unique");
    for f in &figures {
        assert!(f.median.is_finite(), "{}: median {}", f.name, f.median);
        if let Some(b) = f.baseline {
            assert!(b.is_finite(), "{}: baseline {b}", f.name);
        }
    }

    let machine = Machine::detect("smoke".into(), "smoke".into());
    let md = markdown(&machine, &figures);
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| ")).count(),
        figures.len() + 1,
        "one table row per figure, plus the header"
    );
    let report = json(&machine, &figures);
    let objects = report["figures"].as_array().expect("figures array");
    assert_eq!(objects.len(), figures.len());
    for object in objects {
        for key in ["name", "median", "unit", "baseline", "ratio"] {
            assert!(object.get(key).is_some(), "{key} missing in {object}");
        }
    }
}

#[test]
fn the_miss_storm_fetches_once() {
    let figures = cache_bench::run(Mode::Smoke, &["storm".to_owned()]);
    let fetches = figures
        .iter()
        .find(|f| f.name.starts_with("storm/fetches"))
        .expect("fetch count figure");
    assert_eq!(fetches.median, 1.0);
    assert_eq!(fetches.baseline, Some(1.0));
}

#[test]
fn the_soak_runs_samples_and_tears_down() {
    // Judges nothing (the run is too short and the build is debug): it only proves the soak's
    // load, sampling and teardown work, so `cargo xtask soak` does not rot.
    let report = cache_bench::soak::run(&cache_bench::soak::Config::smoke());
    assert!(
        report.samples.len() >= 4,
        "{} samples",
        report.samples.len()
    );
    assert!(report.spawned > 0, "the engine spawned nothing");
    assert!(
        report.samples.iter().any(|s| s.entries > 0.0),
        "no entry was ever cached"
    );
}
