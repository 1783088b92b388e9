//! The four runtimes side by side behind one small interface: tokio (multi-thread with one
//! worker per CPU, and current-thread), async-std and smol.

use std::future::Future;
use std::sync::Arc;

use cache_core::SharedRuntime;

/// Which runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// tokio's multi-thread runtime, one worker per CPU.
    TokioMulti,
    /// tokio's current-thread runtime: everything runs inside `block_on`.
    TokioCurrent,
    /// async-std's global executor.
    AsyncStd,
    /// smol's global executor (`SMOL_THREADS` threads; the bench binary sets one per CPU).
    Smol,
}

impl Flavor {
    /// Every flavour, in report order.
    pub const ALL: [Flavor; 4] = [
        Flavor::TokioMulti,
        Flavor::TokioCurrent,
        Flavor::AsyncStd,
        Flavor::Smol,
    ];

    /// The name used in figure names.
    pub fn name(self) -> &'static str {
        match self {
            Flavor::TokioMulti => "tokio-mt",
            Flavor::TokioCurrent => "tokio-ct",
            Flavor::AsyncStd => "async-std",
            Flavor::Smol => "smol",
        }
    }
}

/// A started runtime and its cache-core adapter.
#[derive(Debug)]
pub struct BenchRt {
    flavor: Flavor,
    tokio: Option<tokio::runtime::Runtime>,
}

impl BenchRt {
    /// Starts (or, for the global executors, names) a runtime.
    pub fn new(flavor: Flavor) -> Self {
        let tokio = match flavor {
            Flavor::TokioMulti => Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(cpus())
                    .enable_all()
                    .build()
                    .expect("tokio runtime"),
            ),
            Flavor::TokioCurrent => Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime"),
            ),
            Flavor::AsyncStd | Flavor::Smol => None,
        };
        Self { flavor, tokio }
    }

    /// The flavour.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The tokio runtime, for tokio flavours.
    pub fn tokio(&self) -> Option<&tokio::runtime::Runtime> {
        self.tokio.as_ref()
    }

    /// The cache-core adapter for this runtime.
    pub fn shared(&self) -> SharedRuntime {
        match (&self.tokio, self.flavor) {
            (Some(rt), _) => Arc::new(cache_tokio::TokioRuntime::from_handle(rt.handle().clone())),
            (None, Flavor::AsyncStd) => Arc::new(cache_async_std::AsyncStdRuntime::new()),
            (None, _) => Arc::new(cache_smol::SmolRuntime::new()),
        }
    }

    /// Runs `future` on the calling thread to completion (spawned tasks keep running on the
    /// runtime's threads; on tokio's current-thread runtime, only inside this call).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        match (&self.tokio, self.flavor) {
            (Some(rt), _) => rt.block_on(future),
            (None, Flavor::AsyncStd) => async_std::task::block_on(future),
            (None, _) => smol::block_on(future),
        }
    }

    /// Spawns a detached task.
    pub fn spawn<F: Future<Output = ()> + Send + 'static>(&self, future: F) {
        match (&self.tokio, self.flavor) {
            (Some(rt), _) => drop(rt.spawn(future)),
            (None, Flavor::AsyncStd) => drop(async_std::task::spawn(future)),
            (None, _) => smol::spawn(future).detach(),
        }
    }

    /// Spawns a task and returns a future of its output.
    pub fn spawn_join<T, F>(&self, future: F) -> impl Future<Output = T> + use<T, F>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = futures::channel::oneshot::channel();
        self.spawn(async move {
            let _ = tx.send(future.await);
        });
        async move { rx.await.expect("spawned task panicked") }
    }
}

/// The number of CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
