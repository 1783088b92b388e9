//! The small harness the real-runtime adversarial cases share (`adversary.rs`,
//! `adversary_watch.rs`): sleeps, timeouts and spawned tasks through the cache's own
//! `Runtime` and `futures`, so that every adapter runs the same cases. A test crate that
//! includes either case file declares it at its root as `harness` (`#[path =
//! "../../cache-core/tests/real_runtime/harness.rs"] mod harness;`).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use cache_core::{SharedRuntime, Sleep};
use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::{AbortHandle, Abortable, Aborted, Either, select};

pub(crate) const MARGIN: Duration = Duration::from_secs(5);

pub(crate) async fn sleep(rt: &SharedRuntime, d: Duration) {
    Sleep::after(&**rt, d).await;
}

/// `fut`'s output if it completes within `d` (else `fut` is dropped).
pub(crate) async fn timeout<F: Future>(
    rt: &SharedRuntime,
    d: Duration,
    fut: F,
) -> Option<F::Output> {
    let fut = std::pin::pin!(fut);
    match select(fut, Sleep::after(&**rt, d)).await {
        Either::Left((out, _)) => Some(out),
        Either::Right(_) => None,
    }
}

/// Awaits `fut`, failing if it takes more than `limit`.
pub(crate) async fn within<F: Future>(
    rt: &SharedRuntime,
    limit: Duration,
    what: &str,
    fut: F,
) -> F::Output {
    timeout(rt, limit, fut)
        .await
        .unwrap_or_else(|| panic!("{what}: not done within {limit:?}"))
}

/// Polls `cond` every few milliseconds until it holds, failing after 10 s.
pub(crate) async fn eventually(rt: &SharedRuntime, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = rt.now() + Duration::from_secs(10);
    while !cond() {
        assert!(rt.now() < deadline, "timed out waiting until {what}");
        sleep(rt, Duration::from_millis(5)).await;
    }
}

/// Lets the runtime run other tasks once.
pub(crate) async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// A task spawned with [`spawn`]: awaiting it gives its output (`Err(Aborted)` once
/// [`Task::abort`] stopped it) and resumes its panic if it panicked.
pub(crate) struct Task<T> {
    output: oneshot::Receiver<std::thread::Result<T>>,
    abort: AbortHandle,
}

impl<T> Task<T> {
    pub(crate) fn abort(&self) {
        self.abort.abort();
    }
}

impl<T> Future for Task<T> {
    type Output = Result<T, Aborted>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.output.poll_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Ok(out))) => Poll::Ready(Ok(out)),
            Poll::Ready(Ok(Err(panic))) => std::panic::resume_unwind(panic),
            Poll::Ready(Err(oneshot::Canceled)) => Poll::Ready(Err(Aborted)),
        }
    }
}

/// Runs `fut` on the cache's runtime (`Runtime::spawn`).
pub(crate) fn spawn<T: Send + 'static>(
    rt: &SharedRuntime,
    fut: impl Future<Output = T> + Send + 'static,
) -> Task<T> {
    let (tx, output) = oneshot::channel();
    let (abort, registration) = AbortHandle::new_pair();
    rt.spawn(Box::pin(async move {
        let run = Abortable::new(AssertUnwindSafe(fut).catch_unwind(), registration);
        if let Ok(out) = run.await {
            let _ = tx.send(out);
        }
    }));
    Task { output, abort }
}
