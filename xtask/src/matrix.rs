//! The test matrix as data: the single source of truth for which packages `cargo xtask test`
//! runs `cargo test -p` on, in order.

/// A package whose tests run in their own `cargo test -p` invocation, so that workspace feature
/// unification cannot hide a missing feature.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    /// The package name, which is also its directory under the workspace root.
    pub(crate) package: &'static str,
    /// Run only if the package's directory exists (for crates that are not written yet).
    pub(crate) only_if_present: bool,
}

/// One row per package; `xtask/tests/tidy.rs` checks that every workspace member has one.
pub(crate) const PACKAGES: &[Row] = &[
    Row::always("cache-core"),
    Row::always("cache-tokio"),
    Row::always("cache-async-std"),
    Row::always("cache-smol"),
    Row::if_present("demo-agent"),
    Row::always("cache-bench"),
    Row::always("xtask"),
];

impl Row {
    const fn always(package: &'static str) -> Self {
        Self {
            package,
            only_if_present: false,
        }
    }

    const fn if_present(package: &'static str) -> Self {
        Self {
            package,
            only_if_present: true,
        }
    }
}
