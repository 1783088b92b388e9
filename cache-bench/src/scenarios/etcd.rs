//! etcd at scale: one demo agent on a local etcd (`--upstream etcd`) with 10 000 distinct keys
//! watched through it (server-sent-event streams of `/v1/watch`, 63 keys each plus one
//! shared key), against a direct etcd watch client.
//!
//! Figures:
//! - connections from the agent to etcd while every key is watched (counted in
//!   `/proc/self/net/tcp{,6}`: established sockets of this process whose remote port is
//!   etcd's client port, taken before any direct client connects);
//! - the agent's memory per watched key (live heap bytes from the counting allocator, and
//!   RSS, before and after the watches open; the SSE client side in this process is
//!   included, so it is an upper bound);
//! - fan-out: the time from one write (straight to etcd, as `etcdctl put` would) of the shared
//!   key to the last SSE stream's event, against the same write reaching the last of as many
//!   direct etcd watches of that key (each its own watch on etcd's JSON gateway, one
//!   connection each, read as they arrive).
//!
//! Skipped, with a message, when no `etcd` binary is on `PATH` (or in `$ETCD_BIN`).

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Mode;
use crate::alloc::Snapshot;
use crate::report::{Figure, Goal};
use crate::rt::cpus;
use crate::stats::median;

/// Keys per SSE stream besides the shared one (the agent allows 64 watches per stream).
const KEYS_PER_STREAM: usize = 63;

/// The etcd binary: `$ETCD_BIN`, else `etcd` on `PATH`.
fn etcd_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ETCD_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
}

/// A single-member etcd on free loopback ports, with its data in a scratch directory; killed
/// and removed on drop.
struct Etcd {
    child: Child,
    dir: PathBuf,
    client: SocketAddr,
}

impl Etcd {
    fn start(binary: &PathBuf) -> io::Result<Self> {
        let ports: Vec<u16> = {
            let listeners = [
                TcpListener::bind("127.0.0.1:0")?,
                TcpListener::bind("127.0.0.1:0")?,
            ];
            listeners
                .iter()
                .map(|l| l.local_addr().map(|a| a.port()))
                .collect::<io::Result<_>>()?
        };
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("cache-bench-etcd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let client = format!("http://127.0.0.1:{}", ports[0]);
        let peer = format!("http://127.0.0.1:{}", ports[1]);
        let child = Command::new(binary)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("bench={peer}")])
            .args(["--log-level", "error", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self {
            child,
            dir,
            client: SocketAddr::from(([127, 0, 0, 1], ports[0])),
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.client)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A response head and the start of its body, read from `stream` (for streamed answers).
async fn send_and_read_head(stream: &mut TcpStream, request: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            if !head.starts_with("HTTP/1.1 200") {
                return Err(io::Error::other(format!("unexpected answer: {head}")));
            }
            return Ok(buf.split_off(end + 4));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::other("connection closed before the head"));
        }
    }
}

/// Decodes a chunked body incrementally: raw bytes in, body bytes out.
#[derive(Default)]
struct Dechunker {
    raw: Vec<u8>,
}

impl Dechunker {
    fn feed(&mut self, bytes: &[u8], body: &mut Vec<u8>) {
        self.raw.extend_from_slice(bytes);
        loop {
            let Some(line) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size = std::str::from_utf8(&self.raw[..line])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .unwrap_or(0);
            if self.raw.len() < line + 2 + size + 2 {
                return;
            }
            body.extend_from_slice(&self.raw[line + 2..line + 2 + size]);
            self.raw.drain(..line + 2 + size + 2);
            shrink(&mut self.raw);
        }
    }
}

/// Gives back a buffer's spare room beyond a little: the SSE readers run in the measured
/// process, so what they keep between events would count as the agent's memory.
fn shrink(buffer: &mut Vec<u8>) {
    if buffer.capacity() > 256 {
        buffer.shrink_to(buffer.len().max(64));
    }
}

/// One-line HTTP/1.1 POST with a JSON body.
fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Standard base64 with padding (what etcd's gateway takes for bytes).
fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Puts `key` straight into etcd (through its gateway, as `etcdctl put` would); the revision.
async fn direct_put(etcd: SocketAddr, key: &str, value: &str) -> io::Result<u64> {
    let mut stream = TcpStream::connect(etcd).await?;
    stream.set_nodelay(true)?;
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        b64(key.as_bytes()),
        b64(value.as_bytes())
    );
    let request = post("/v3/kv/put", &body);
    let mut rest = send_and_read_head(&mut stream, &request).await?;
    // A short answer: read until its JSON closes.
    // The answer is short: plain (`Content-Length`) or chunked; read until its JSON closes.
    let mut text = Vec::new();
    let mut dechunk = Dechunker::default();
    loop {
        if rest.starts_with(b"{") || !text.is_empty() && dechunk.raw.is_empty() {
            text.extend_from_slice(&rest);
        } else {
            dechunk.feed(&rest, &mut text);
        }
        rest.clear();
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&text) {
            return Ok(value["header"]["revision"]
                .as_str()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0));
        }
        let mut more = vec![0; 4096];
        let n = stream.read(&mut more).await?;
        if n == 0 {
            return Err(io::Error::other("put: connection closed"));
        }
        rest.extend_from_slice(&more[..n]);
    }
}

/// Established TCP connections of this process to `port` (from `/proc/self/fd` and
/// `/proc/self/net/tcp{,6}`); `None` without `/proc`.
fn connections_to(port: u16) -> Option<usize> {
    let inodes: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let mut count = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "01" {
                continue;
            }
            let remote_port = fields[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote_port == Some(port) && inodes.contains(fields[9]) {
                count += 1;
            }
        }
    }
    Some(count)
}

/// What the SSE readers have seen.
#[derive(Default)]
struct Seen {
    /// Initial events received (one per watched key, shared key included).
    initial: AtomicU64,
    /// Streams whose shared key reached the round's index.
    reached: AtomicU64,
    /// The round's index of the shared key.
    target: AtomicU64,
}

/// Opens one SSE stream of `/v1/watch` for `keys` (plus `shared`) and reads it forever. It
/// runs in the measured process, so it keeps as little as it can between events.
async fn sse_stream(agent: SocketAddr, keys: &[String], shared: &str, seen: Arc<Seen>) {
    let request = {
        let mut query: Vec<String> = keys.iter().map(|k| format!("key={k}")).collect();
        query.push(format!("key={shared}"));
        format!(
            "GET /v1/watch?{} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n",
            query.join("&")
        )
    };
    let Ok(mut stream) = TcpStream::connect(agent).await else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let sent = send_and_read_head(&mut stream, request.as_bytes()).await;
    drop(request);
    let Ok(first) = sent else {
        return;
    };
    let shared_id = format!("key:{shared}");
    let mut dechunk = Dechunker::default();
    let mut body = Vec::new();
    let mut incoming = first;
    let mut shared_index = 0;
    loop {
        dechunk.feed(&incoming, &mut body);
        incoming.clear();
        while let Some(end) = body.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = body.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&frame);
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&data) else {
                continue;
            };
            let id = event["correlation_id"].as_str().unwrap_or("");
            let index = event["index"].as_u64().unwrap_or(0);
            if id == shared_id {
                if shared_index == 0 {
                    seen.initial.fetch_add(1, Ordering::Relaxed);
                }
                if index >= seen.target.load(Ordering::Acquire) && shared_index < index {
                    seen.reached.fetch_add(1, Ordering::AcqRel);
                }
                shared_index = index;
            } else if event["error"].is_null() {
                seen.initial.fetch_add(1, Ordering::Relaxed);
            }
        }
        shrink(&mut body);
        shrink(&mut incoming);
        incoming.reserve(1024);
        match stream.read_buf(&mut incoming).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A direct etcd watch of `key` from `start` (one gateway watch, one connection); counts
/// into `reached` when an event arrives.
async fn direct_watch(
    etcd: SocketAddr,
    key: String,
    start: u64,
    reached: Arc<AtomicU64>,
    ready: Arc<AtomicU64>,
) {
    let Ok(mut stream) = TcpStream::connect(etcd).await else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let body = format!(
        r#"{{"create_request":{{"key":"{}","start_revision":"{start}"}}}}"#,
        b64(key.as_bytes())
    );
    let Ok(first) = send_and_read_head(&mut stream, &post("/v3/watch", &body)).await else {
        return;
    };
    let mut dechunk = Dechunker::default();
    let mut text = Vec::new();
    let mut incoming = first;
    let mut depth_scan = 0;
    loop {
        dechunk.feed(&incoming, &mut text);
        incoming.clear();
        // One JSON object per message; count those that carry events.
        while let Some(end) = find_object_end(&text[depth_scan..]).map(|e| e + depth_scan) {
            let object: Vec<u8> = text.drain(..=end).collect();
            depth_scan = 0;
            let s = String::from_utf8_lossy(&object);
            if s.contains("\"created\":true") {
                ready.fetch_add(1, Ordering::Relaxed);
            }
            if s.contains("\"events\"") {
                reached.fetch_add(1, Ordering::AcqRel);
            }
        }
        let mut buf = vec![0; 16 * 1024];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => incoming.extend_from_slice(&buf[..n]),
        }
    }
}

/// The end of the first complete top-level JSON object in `bytes`.
fn find_object_end(bytes: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut started = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => {
                depth += 1;
                started = true;
            }
            b'}' if started => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Waits until `done` or `within` passes; whether it is done.
async fn until(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Opens the SSE streams for `names` (63 keys each, plus `shared`) on `agent` and waits until
/// every initial event arrived and `ready` holds (at most 300 s): what the streams saw, how
/// long it took, whether everything was ready.
fn open_watches(
    driver: &tokio::runtime::Runtime,
    agent: SocketAddr,
    names: &Arc<[String]>,
    shared: &str,
    ready: impl Fn() -> bool,
) -> (Arc<Seen>, Duration, bool) {
    let seen = Arc::new(Seen::default());
    let opened = Instant::now();
    let mut streams = 0;
    let all = driver.block_on(async {
        for start in (0..names.len()).step_by(KEYS_PER_STREAM) {
            streams += 1;
            let (names, shared, seen) = (names.clone(), shared.to_owned(), seen.clone());
            tokio::spawn(async move {
                let end = (start + KEYS_PER_STREAM).min(names.len());
                sse_stream(agent, &names[start..end], &shared, seen).await;
            });
        }
        let initial = (names.len() + streams) as u64;
        until(Duration::from_secs(300), || {
            seen.initial.load(Ordering::Relaxed) >= initial && ready()
        })
        .await
    });
    (seen, opened.elapsed(), all)
}

/// The embedded store's open blocking reads.
fn poll_blocking_open(
    rt: &tokio::runtime::Runtime,
    memory: &Arc<demo_agent::upstream::MemoryUpstream>,
) -> u64 {
    use demo_agent::upstream::Upstream as _;
    let memory = memory.clone();
    rt.spawn(async move { memory.stats().await.map_or(0, |s| s.blocking_open) })
        .now_or_never_blocking()
}

/// Waits for a spawned task's answer from outside the runtime that runs it.
trait NowOrNeverBlocking<T> {
    fn now_or_never_blocking(self) -> T;
}

impl<T: Send + 'static> NowOrNeverBlocking<T> for tokio::task::JoinHandle<T> {
    fn now_or_never_blocking(self) -> T {
        futures::executor::block_on(self).expect("stats task")
    }
}

/// Live bytes per open blocking read of `upstream` (one spawned task per key, blocked at
/// index `at`), measured once `ready`; the reads are then ended by `close`.
async fn per_open_read<U: demo_agent::upstream::Upstream>(
    names: &[String],
    upstream: Arc<U>,
    at: u64,
    wait: Duration,
    ready: impl Fn() -> bool,
) -> f64 {
    use demo_agent::upstream::Query;
    let before = Snapshot::take();
    let tasks: Vec<_> = names
        .iter()
        .map(|key| {
            let upstream = upstream.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let _ = upstream.get(&key, Query::blocking(at, wait)).await;
            })
        })
        .collect();
    until(Duration::from_secs(120), ready).await;
    let after = Snapshot::take();
    upstream.close();
    for task in tasks {
        let _ = task.await;
    }
    before.live_per(&after, names.len())
}

/// The scenario (see the module docs).
pub fn run(mode: Mode) -> Vec<Figure> {
    let Some(binary) = etcd_binary() else {
        eprintln!(
            "SKIP etcd: no `etcd` binary on PATH (install etcd-server, or set ETCD_BIN); \
             the etcd figures are missing from this report"
        );
        return Vec::new();
    };
    let keys = mode.pick(10_000, 10_000, 126);
    let rounds = mode.pick(7, 5, 1);

    let etcd = match Etcd::start(&binary) {
        Ok(etcd) => etcd,
        Err(error) => {
            eprintln!("SKIP etcd: etcd did not start: {error}");
            return Vec::new();
        }
    };
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus())
        .enable_all()
        .build()
        .expect("server runtime");
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("driver runtime");

    // etcd up (a put answers), then the agent on it.
    let up = driver.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if direct_put(etcd.client, "bench/up", "1").await.is_ok() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    if !up {
        eprintln!("SKIP etcd: etcd did not answer in 20 s");
        return Vec::new();
    }
    // Baseline: the same watches through an agent on its embedded store (what the cache, the
    // refresh fetches and the SSE streams cost without etcd).
    // Shared with the SSE readers (made before any measurement, so none of them copies it).
    let names: Arc<[String]> = (0..keys).map(|i| format!("k/{i:05}")).collect();
    let shared = "fan/shared".to_owned();
    // For a heap profiler (heaptrack, valgrind's dhat): `CACHE_BENCH_ETCD_PROFILE=exit` skips
    // the baseline and exits right after the watches opened, so that what is still allocated
    // at exit is what the watches hold; `=exit-before` exits just before they open (the
    // difference of the two profiles is the watches' cost, by call site).
    let profile_exit = std::env::var("CACHE_BENCH_ETCD_PROFILE").unwrap_or_default();
    let exit_after_watches = profile_exit.starts_with("exit");
    let embedded_per_key = if exit_after_watches {
        0.0
    } else {
        let agent = server_rt
            .block_on(demo_agent::Agent::start(demo_agent::Config::for_tests()))
            .expect("embedded agent starts");
        let memory = agent.state().memory().expect("an embedded agent").clone();
        server_rt.block_on(async {
            use demo_agent::upstream::Upstream as _;
            for key in names.iter().chain([&shared]) {
                memory
                    .put(key, b"0123456789abcdef".to_vec(), 0, None)
                    .await
                    .expect("put");
            }
        });
        let before = Snapshot::take();
        let (_seen, _took, _all) = open_watches(&driver, agent.addr(), &names, &shared, || {
            poll_blocking_open(&server_rt, &memory) > keys as u64
        });
        let after = Snapshot::take();
        drop(agent);
        before.live_per(&after, keys)
    };

    let mut config = demo_agent::Config::for_tests();
    config.upstream = demo_agent::UpstreamKind::Etcd;
    config.etcd_endpoints = vec![etcd.url()];
    let agent = server_rt
        .block_on(demo_agent::Agent::start(config))
        .expect("agent starts");
    let agent_addr = agent.addr();
    let upstream = agent.state().etcd().expect("an etcd agent").clone();

    // The keys exist (written concurrently through the agent's upstream).
    server_rt.block_on(async {
        use demo_agent::upstream::Upstream as _;
        futures::stream::iter(names.iter())
            .map(|key| {
                let upstream = upstream.clone();
                async move {
                    upstream
                        .put(key, b"0123456789abcdef".to_vec(), 0, None)
                        .await
                        .expect("put");
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<()>>()
            .await;
    });
    let shared_rev = driver
        .block_on(direct_put(etcd.client, &shared, "0"))
        .expect("put the shared key");

    // ----- every key watched through the agent -----
    let profile = std::env::var_os("CACHE_BENCH_ETCD_PROFILE").is_some();
    crate::alloc::track_sizes(profile);
    if profile_exit == "exit-before" {
        eprintln!("etcd: exiting before the watches open");
        std::process::exit(0);
    }
    let before = Snapshot::take();
    let stream_count = names.len().div_ceil(KEYS_PER_STREAM);
    let (seen, open_took, watched_all) = open_watches(&driver, agent_addr, &names, &shared, || {
        upstream.traffic().watches_open > keys as u64
    });
    let after = Snapshot::take();
    if profile {
        crate::alloc::track_sizes(false);
        let top: Vec<String> = crate::alloc::sizes()
            .into_iter()
            .take(25)
            .map(|(size, n)| format!("{size}B×{:.2}", n as f64 / keys as f64))
            .collect();
        eprintln!("etcd: allocations per key while the watches opened (size×count): {top:?}");
    }
    let traffic = upstream.traffic();
    if exit_after_watches {
        eprintln!(
            "etcd: {:.0} B/key live; exiting with the watches open ({traffic:?})",
            before.live_per(&after, keys)
        );
        std::process::exit(0);
    }
    if !watched_all {
        eprintln!(
            "etcd: not every watch opened in 300 s ({} initial events, {traffic:?})",
            seen.initial.load(Ordering::Relaxed)
        );
    }
    let connections = connections_to(etcd.client.port()).unwrap_or(0);
    let live_per_key = before.live_per(&after, keys);
    let rss_per_key = before.rss_per(&after, keys);
    eprintln!(
        "etcd: {keys} keys on {stream_count} SSE streams watched in {open_took:?}; \
         {connections} connection(s) to etcd; {live_per_key:.0} B/key live, \
         {rss_per_key:.0} B/key RSS; {traffic:?}"
    );

    // ----- fan-out: one write of the shared key → every SSE stream / every direct watch -----
    let direct_reached = Arc::new(AtomicU64::new(0));
    let direct_ready = Arc::new(AtomicU64::new(0));
    let mut ours = Vec::new();
    let mut direct = Vec::new();
    driver.block_on(async {
        for _ in 0..stream_count {
            tokio::spawn(direct_watch(
                etcd.client,
                shared.clone(),
                shared_rev + 1,
                direct_reached.clone(),
                direct_ready.clone(),
            ));
        }
        until(Duration::from_secs(30), || {
            direct_ready.load(Ordering::Relaxed) >= stream_count as u64
        })
        .await;
        for round in 0..rounds {
            seen.reached.store(0, Ordering::Release);
            direct_reached.store(0, Ordering::Release);
            // The target index is set before the write: any event at or above it counts.
            let expected = upstream.counters().index + 1;
            seen.target.store(expected, Ordering::Release);
            let started = Instant::now();
            let revision = direct_put(etcd.client, &shared, &round.to_string())
                .await
                .expect("write the shared key");
            seen.target.store(revision, Ordering::Release);
            let mut ours_at = None;
            let mut direct_at = None;
            let all = stream_count as u64;
            let deadline = started + Duration::from_secs(30);
            while (ours_at.is_none() || direct_at.is_none()) && Instant::now() < deadline {
                if ours_at.is_none() && seen.reached.load(Ordering::Acquire) >= all {
                    ours_at = Some(started.elapsed());
                }
                if direct_at.is_none() && direct_reached.load(Ordering::Acquire) >= all {
                    direct_at = Some(started.elapsed());
                }
                tokio::task::yield_now().await;
            }
            ours.push(ours_at.unwrap_or(Duration::from_secs(30)).as_secs_f64() * 1e3);
            direct.push(direct_at.unwrap_or(Duration::from_secs(30)).as_secs_f64() * 1e3);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    drop(agent);

    // The upstreams alone: one open blocking read per key (a spawned task each), on a fresh
    // etcd upstream and on a fresh embedded store.
    let (etcd_read, memory_read) = server_rt.block_on(async {
        use demo_agent::upstream::{
            EtcdSettings, EtcdUpstream, FaultSettings, Faults, MemoryUpstream, Query, Upstream as _,
        };
        let wait = Duration::from_secs(600);
        let etcd_up = EtcdUpstream::new(
            EtcdSettings::new(vec![etcd.url()]),
            Faults::new(FaultSettings::default()),
        )
        .expect("an etcd upstream");
        let at = etcd_up
            .get(&names[0], Query::now())
            .await
            .map_or(1, |r| r.index);
        let at = at.max(etcd_up.counters().index);
        let etcd_read = per_open_read(&names, etcd_up.clone(), at, wait, || {
            etcd_up.traffic().watches_open >= keys as u64
        })
        .await;
        let memory = MemoryUpstream::new(Faults::new(FaultSettings::default()));
        for key in names.iter() {
            let _ = memory.put(key, b"0123456789abcdef".to_vec(), 0, None).await;
        }
        let at = memory.stats().await.map_or(1, |s| s.index);
        let probe = memory.clone();
        let memory_read = per_open_read(&names, memory.clone(), at, wait, move || {
            probe.counters().blocking_open >= keys as u64
        })
        .await;
        (etcd_read, memory_read)
    });
    drop(etcd);

    let at = |n: usize| format!("{n} watched keys on {stream_count} SSE streams");
    vec![
        Figure::new("etcd/connections to etcd", connections as f64, "conns")
            .goal(Goal::AtMost(4.0))
            .note(format!(
                "{}; established sockets of the process to etcd's port ({} etcd watches on {} stream(s))",
                at(keys),
                traffic.watches_open,
                traffic.watch_streams
            )),
        Figure::new("etcd/agent memory per watched key", live_per_key, "B/key")
            .baseline("the same watches on the embedded store", embedded_per_key)
            .goal(Goal::AtMost(2048.0))
            .note(format!(
                "{}; live heap bytes added (cache entry, fetch, etcd watch, SSE), RSS {:.0} B/key",
                at(keys),
                rss_per_key
            )),
        Figure::new("etcd/upstream memory per open blocking read", etcd_read, "B/read")
            .baseline("the embedded store", memory_read)
            .note(format!(
                "{keys} blocking reads straight on the upstream (one spawned task each), no cache"
            )),
        Figure::new("etcd/fan-out: write → last SSE event", median(&ours), "ms")
            .baseline(
                format!("{stream_count} direct etcd watches (gateway)"),
                median(&direct),
            )
            .goal(Goal::RatioAtMost(2.0))
            .note(format!(
                "one put of a key all {stream_count} streams watch, while {keys} other keys are watched; median of {rounds}"
            )),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_chunks_and_objects() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"from etcdctl"), "ZnJvbSBldGNkY3Rs");
        let mut d = Dechunker::default();
        let mut body = Vec::new();
        d.feed(b"3\r\nab", &mut body);
        assert!(body.is_empty());
        d.feed(b"c\r\n2\r\nde\r\n", &mut body);
        assert_eq!(body, b"abcde");
        assert_eq!(find_object_end(br#"{"a":{"b":"}"}}{"#), Some(14));
        assert_eq!(find_object_end(br#"{"a":1"#), None);
    }
}
