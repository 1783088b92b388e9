//! Auto traits of the public API, pinned so a change cannot silently break users (tokio's
//! `async_send_sync.rs`): axum handlers and spawned tasks need `Send` futures.

use cache_core::sim::SimRuntime;
use cache_core::testing::{MockRequest, MockType};
use cache_core::watch::UpdateEvent;
use cache_core::{Cache, RegisterOptions, TypedCache, WatchHandle, WatchStream};

fn assert_send<T: Send>(_: &T) {}
fn assert_send_sync<T: Send + Sync + 'static>() {}

#[test]
fn handles_are_send_and_sync() {
    assert_send_sync::<Cache>();
    assert_send_sync::<TypedCache<MockType<u64>>>();
    assert_send_sync::<WatchHandle>();
    assert_send_sync::<cache_core::GetError<std::io::Error>>();
    assert_send_sync::<UpdateEvent<String, u64, std::io::Error>>();
    fn assert_send_only<T: Send>() {}
    assert_send_only::<WatchStream<u64, std::io::Error>>();
}

#[test]
fn get_futures_are_send() {
    let sim = SimRuntime::new(1);
    let cache = Cache::new(sim.handle());
    let typed = cache.register(MockType::new(RegisterOptions::new(), |_, _| async {
        Ok(cache_core::FetchResult::new(1u64, 1))
    }));
    let request = MockRequest::new("k");
    assert_send(&typed.get(&request));
    assert_send(&typed.get_outcome(&request));
    assert_send(&cache.get::<MockType<u64>>(&request));
    // A get future can be spawned onto a runtime.
    let typed2 = typed.clone();
    sim.spawn_detached(async move {
        let request = MockRequest::new("k");
        let _ = typed2.get(&request).await;
    });
    sim.block_on(async {
        assert_eq!(typed.get(&request).await.unwrap().value, Some(1));
    });
}
