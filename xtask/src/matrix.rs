//! The test matrix as data: the single source of truth for which packages `cargo xtask test`
//! runs `cargo test -p` on, in order.

/// A package whose tests run in their own `cargo test -p` invocation, so that workspace feature
/// unification cannot hide a missing feature.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    /// The package name, which is also its directory under the workspace root.
    pub(crate) package: &'static str,
}

/// One row per package; `xtask/tests/tidy.rs` checks that every workspace member has one.
pub(crate) const PACKAGES: &[Row] = &[
    Row::new("cache-core"),
    Row::new("cache-tokio"),
    Row::new("cache-async-std"),
    Row::new("cache-smol"),
    Row::new("demo-agent"),
    Row::new("cache-bench"),
    Row::new("xtask"),
];

impl Row {
    const fn new(package: &'static str) -> Self {
        Self { package }
    }
}
