//! Pins down the auto traits of the adapter, so a regression fails to compile here rather than
//! in a user's code.

use std::sync::Arc;
use std::time::Duration;

use cache_core::{Runtime, SharedRuntime, Sleep};
use cache_tokio::TokioRuntime;

fn assert_send_sync_static<T: Send + Sync + 'static>() {}
fn assert_send<T: Send>(_: &T) {}

#[test]
fn runtime_is_send_sync_static() {
    assert_send_sync_static::<TokioRuntime>();
}

#[test]
fn runtime_is_usable_as_a_shared_dyn_runtime() {
    let tokio_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtime: SharedRuntime =
        Arc::new(TokioRuntime::from_handle(tokio_runtime.handle().clone()));
    let as_dyn: Arc<dyn Runtime> = runtime.clone();
    let timer = as_dyn.timer(as_dyn.now() + Duration::from_millis(1));
    assert_send(&timer);
    let sleep = Sleep::after(&*as_dyn, Duration::from_millis(1));
    assert_send(&sleep);
    tokio_runtime.block_on(sleep);
}
