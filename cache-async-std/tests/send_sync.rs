//! Pins down the auto traits of the adapter, so a regression fails to compile here rather than
//! in a user's code.

use std::sync::Arc;
use std::time::Duration;

use cache_async_std::AsyncStdRuntime;
use cache_core::{Runtime, SharedRuntime, Sleep};

fn assert_send_sync_static<T: Send + Sync + 'static>() {}
fn assert_send<T: Send>(_: &T) {}

#[test]
fn runtime_is_send_sync_static() {
    assert_send_sync_static::<AsyncStdRuntime>();
}

#[test]
fn runtime_is_usable_as_a_shared_dyn_runtime() {
    let runtime: SharedRuntime = Arc::new(AsyncStdRuntime::default());
    let as_dyn: Arc<dyn Runtime> = runtime.clone();
    let timer = as_dyn.timer(as_dyn.now() + Duration::from_millis(1));
    assert_send(&timer);
    let sleep = Sleep::after(&*as_dyn, Duration::from_millis(1));
    assert_send(&sleep);
    async_std::task::block_on(sleep);
}
