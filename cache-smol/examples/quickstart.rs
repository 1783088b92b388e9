//! Quick start: a blocking cache type served through the cache on smol.
//! Run it with `cargo run -p cache-smol --example quickstart`.

use std::sync::Arc;

use cache_core::{
    Cache, CacheRequest, CacheType, FetchOptions, FetchResult, RegisterOptions, RequestInfo,
};

/// A cache type: how to fetch one kind of data from the authoritative server.
struct ServiceHealth;

/// What callers ask for. `cache_info` names the entry and carries the blocking-query index.
#[derive(Clone)]
struct HealthRequest {
    service: String,
    min_index: u64,
}

impl CacheRequest for HealthRequest {
    fn cache_info(&self) -> RequestInfo<'_> {
        RequestInfo::new(self.service.as_str()).min_index(self.min_index)
    }
}

impl CacheType for ServiceHealth {
    type Request = HealthRequest;
    type Value = Arc<Vec<String>>;
    type Error = std::io::Error;

    fn register_options(&self) -> RegisterOptions {
        RegisterOptions::new().supports_blocking(true)
    }

    async fn fetch(
        &self,
        _opts: FetchOptions<Self::Value>,
        request: &HealthRequest,
    ) -> std::io::Result<FetchResult<Self::Value>> {
        // A real type sends a blocking query here: "answer once your index is above
        // opts.min_index, or after opts.timeout". This stand-in answers at once, at index 42.
        let nodes = vec![format!("{}-1: passing", request.service)];
        Ok(FetchResult::new(Arc::new(nodes), 42))
    }
}

fn main() {
    smol::block_on(async {
        let cache = Cache::new(Arc::new(cache_smol::SmolRuntime::new()));
        run(cache).await;
    });
}

async fn run(cache: Cache) {
    let health = cache.register(ServiceHealth);
    let request = HealthRequest {
        service: "web".into(),
        min_index: 0,
    };

    let first = health.get(&request).await.expect("fetch failed"); // a miss: fetched
    let second = health.get(&request).await.expect("fetch failed"); // a hit: from memory
    assert!(!first.meta.hit && second.meta.hit);
    println!(
        "{:?} at index {} (hit: {})",
        second.value, second.meta.index, second.meta.hit
    );

    cache.close();
}
