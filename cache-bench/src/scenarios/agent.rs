//! Agent HTTP: the demo agent's cached `GET /v1/kv/{key}` over loopback with keep-alive,
//! against a bare axum handler returning the same body as a constant; and the blocking-read
//! wake-up (a write → every blocked reader answered) against a bare axum long-poll handler on a
//! `tokio::sync::watch`.
//!
//! Both servers run in this process on one tokio multi-thread runtime (a worker per CPU). The
//! load generator is our own small HTTP/1.1 keep-alive driver (one request in flight per
//! connection, `Content-Length` or chunked bodies) on a tokio current-thread runtime on the
//! main thread, so it competes for the same 2 cores with both servers alike. wrk is not used:
//! one driver for both sides is what makes the ratio fair.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Mode;
use crate::report::{Figure, Goal};
use crate::rt::cpus;
use crate::stats::{interleave, median, p99};

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Sends `request` (a whole HTTP/1.1 request) and reads one response: (status, body).
    async fn request(&mut self, request: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        self.stream.write_all(request).await?;
        loop {
            if let Some(done) = parse_response(&self.buf)? {
                let (status, body, used) = done;
                self.buf.drain(..used);
                return Ok((status, body));
            }
            self.buf.reserve(8192);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-response",
                ));
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A complete response at the start of `buf`: (status, body, bytes used), or `None` if more
/// bytes are needed.
fn parse_response(buf: &[u8]) -> io::Result<Option<(u16, Vec<u8>, usize)>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>().map_err(|_| bad("length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.trim().eq_ignore_ascii_case("chunked")
        {
            chunked = true;
        }
    }
    let start = head_end + 4;
    if chunked {
        let mut body = Vec::new();
        let mut at = start;
        loop {
            let Some(line_end) = find(&buf[at..], b"\r\n") else {
                return Ok(None);
            };
            let size_text =
                std::str::from_utf8(&buf[at..at + line_end]).map_err(|_| bad("chunk"))?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("chunk size"))?;
            let data = at + line_end + 2;
            if buf.len() < data + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&buf[data..data + size]);
            at = data + size + 2;
            if size == 0 {
                return Ok(Some((status, body, at)));
            }
        }
    }
    let length = length.unwrap_or(0);
    if buf.len() < start + length {
        return Ok(None);
    }
    Ok(Some((
        status,
        buf[start..start + length].to_vec(),
        start + length,
    )))
}

fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes()
}

fn put_request(path: &str, body: &str) -> Vec<u8> {
    format!(
        "PUT {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The index of a JSON response body: the bare baseline's `index` field, or the
/// `ModifyIndex` of the first entry of the agent's Consul-shaped answer.
fn index_of(body: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["index"].as_u64().or_else(|| v[0]["ModifyIndex"].as_u64()))
        .unwrap_or_else(|| panic!("no index in {}", String::from_utf8_lossy(body)))
}

/// Requests per second of `conns` keep-alive connections each sending `path` in a loop for
/// `duration`; connections are opened before the clock starts.
async fn throughput(addr: SocketAddr, path: &str, conns: usize, duration: Duration) -> f64 {
    let request: Arc<[u8]> = get_request(path).into();
    let mut open = Vec::with_capacity(conns);
    for _ in 0..conns {
        open.push(Conn::connect(addr).await.expect("connect"));
    }
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = open
        .into_iter()
        .map(|mut conn| {
            let request = request.clone();
            let done = done.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let (status, _) = conn.request(&request).await.expect("request");
                    assert_eq!(status, 200, "load request failed");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("load task");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// A long-poll target: where to read, where to write, and how many reads are blocked now.
struct Target {
    addr: SocketAddr,
    key_path: String,
    blocked: Box<dyn Fn() -> u64>,
}

/// One wake-up round: `readers` block on the key past its current index, then one write; the
/// latency of each reader (write sent → its response read), in ms.
async fn wake_round(target: &Target, readers: &mut Vec<Conn>, writer: &mut Conn) -> Vec<f64> {
    // The current index, as the cache reports it.
    let (_, body) = writer
        .request(&get_request(&format!("{}?cached", target.key_path)))
        .await
        .expect("read");
    let index = index_of(&body);
    let read = get_request(&format!(
        "{}?cached&index={index}&wait=60s",
        target.key_path
    ));
    let blocked_before = (target.blocked)();
    let tasks: Vec<_> = readers
        .drain(..)
        .map(|mut conn| {
            let read = read.clone();
            tokio::spawn(async move {
                let (status, body) = conn.request(&read).await.expect("blocking read");
                let at = Instant::now();
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                (conn, at, index_of(&body))
            })
        })
        .collect();
    let want = blocked_before + tasks.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (target.blocked)() < want {
        assert!(Instant::now() < deadline, "readers did not block");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The counters move just before a read parks; give the last ones time to park.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let start = Instant::now();
    let (status, _) = writer
        .request(&put_request(&target.key_path, "changed"))
        .await
        .expect("write");
    assert_eq!(status, 200);
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (conn, at, new_index) = task.await.expect("reader");
        assert!(new_index > index, "a reader returned without a change");
        latencies.push((at - start).as_secs_f64() * 1e3);
        readers.push(conn);
    }
    latencies
}

/// The bare long-poll server's state.
#[derive(Clone)]
struct Bare {
    index: Arc<tokio::sync::watch::Sender<u64>>,
    body: Arc<str>,
}

/// `GET /v1/kv/bench`: the agent's own answer to the same read, as a constant.
async fn bare_constant(State(bare): State<Bare>) -> impl IntoResponse {
    (
        [("content-type", "application/json")],
        bare.body.to_string(),
    )
}

/// `GET` with `index=N`: waits until the index passes N (no `wait` bound: the bench always
/// writes); without it, answers the current index at once.
async fn bare_long_poll(State(bare): State<Bare>, RawQuery(query): RawQuery) -> impl IntoResponse {
    let min = query.as_deref().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("index="))
            .and_then(|v| v.parse::<u64>().ok())
    });
    let mut rx = bare.index.subscribe();
    let index = loop {
        let now = *rx.borrow_and_update();
        if min.is_none_or(|min| now > min) {
            break now;
        }
        if rx.changed().await.is_err() {
            break now;
        }
    };
    (
        [("content-type", "application/json")],
        format!("{{\"index\":{index}}}\n"),
    )
}

async fn bare_put(State(bare): State<Bare>) -> String {
    bare.index.send_modify(|i| *i += 1);
    format!("{{\"index\":{}}}\n", *bare.index.borrow())
}

/// Runs the scenario.
pub fn run(mode: Mode) -> Vec<Figure> {
    let conns = mode.pick(50, 50, 4);
    let duration = mode.pick(
        Duration::from_secs(2),
        Duration::from_secs(1),
        Duration::from_millis(100),
    );
    let rounds = mode.pick(7, 3, 1);
    let readers = mode.pick(1_000, 1_000, 20);
    let wake_rounds = mode.pick(11, 5, 1);

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus())
        .enable_all()
        .build()
        .expect("server runtime");
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("driver runtime");

    // The agent, with one key written and cached.
    let agent = server_rt
        .block_on(demo_agent::Agent::start(demo_agent::Config::for_tests()))
        .expect("agent starts");
    let agent_addr = agent.addr();
    let state = agent.state().clone();
    let (body, hit) = driver.block_on(async {
        let mut conn = Conn::connect(agent_addr).await.expect("connect");
        for key in ["/v1/kv/bench", "/v1/kv/wake"] {
            let (status, _) = conn
                .request(&put_request(key, "0123456789abcdef"))
                .await
                .expect("put");
            assert_eq!(status, 200);
        }
        conn.request(&get_request("/v1/kv/bench?cached"))
            .await
            .expect("warm");
        let (status, body) = conn
            .request(&get_request("/v1/kv/bench?cached"))
            .await
            .expect("hit");
        assert_eq!(status, 200);
        let hits = state.cache().metrics().total().hits;
        (String::from_utf8(body).expect("utf-8"), hits > 0)
    });
    assert!(hit, "the agent's cached read was not a hit");

    // The bare server: the same routes, constant answers.
    let (index_tx, _) = tokio::sync::watch::channel(1u64);
    let bare = Bare {
        index: Arc::new(index_tx),
        body: body.into(),
    };
    let app = Router::new()
        .route("/v1/kv/bench", get(bare_constant))
        .route("/v1/kv/{*key}", get(bare_long_poll).put(bare_put))
        .with_state(bare.clone());
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let bare_addr = listener.local_addr().expect("addr");
    server_rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // ----- throughput -----
    let mut ours = || {
        driver.block_on(throughput(
            agent_addr,
            "/v1/kv/bench?cached",
            conns,
            duration,
        ))
    };
    let mut base = || driver.block_on(throughput(bare_addr, "/v1/kv/bench", conns, duration));
    let s = interleave(rounds, &mut [&mut ours, &mut base]);
    let mut figures = vec![
        Figure::new("agent/cached GET /v1/kv/{key}", median(&s[0]), "req/s")
            .baseline("bare axum handler, constant body", median(&s[1]))
            .goal(Goal::RatioAtLeast(0.9))
            .note(format!(
                "{conns} keep-alive connections, one request in flight each, {} s per sample, \
                 own HTTP/1.1 driver on one thread; both servers in-process on a {}-worker \
                 tokio runtime; the bare handler returns the agent's body as a constant",
                duration.as_secs_f64(),
                cpus()
            )),
    ];

    // ----- blocking-read wake-up -----
    let ours_target = Target {
        addr: agent_addr,
        key_path: "/v1/kv/wake".to_owned(),
        blocked: {
            let state = state.clone();
            Box::new(move || state.cache().metrics().total().misses_blocking)
        },
    };
    let bare_target = Target {
        addr: bare_addr,
        key_path: "/v1/kv/wake".to_owned(),
        blocked: {
            // Receivers alive now: none between rounds, one per parked read during one.
            let index = bare.index.clone();
            Box::new(move || index.receiver_count() as u64)
        },
    };
    let mut pools: HashMap<&str, (Vec<Conn>, Conn)> = HashMap::new();
    driver.block_on(async {
        for (name, target) in [("ours", &ours_target), ("bare", &bare_target)] {
            let mut conns = Vec::with_capacity(readers);
            for _ in 0..readers {
                conns.push(Conn::connect(target.addr).await.expect("connect"));
            }
            let writer = Conn::connect(target.addr).await.expect("connect");
            pools.insert(name, (conns, writer));
        }
    });
    let mut all = [Vec::new(), Vec::new()];
    let mut each = [Vec::new(), Vec::new()];
    for round in 0..wake_rounds {
        for step in 0..2 {
            // Alternate which goes first.
            let side = (round + step) % 2;
            let (name, target) = if side == 0 {
                ("ours", &ours_target)
            } else {
                ("bare", &bare_target)
            };
            let (readers, writer) = pools.get_mut(name).expect("pool");
            let latencies = driver.block_on(wake_round(target, readers, writer));
            all[side].push(latencies.iter().copied().fold(0.0, f64::max));
            each[side].extend(latencies);
        }
    }
    figures.push(
        Figure::new(
            format!("agent/blocking wake-up, {readers} readers, all answered"),
            median(&all[0]),
            "ms",
        )
        .p99(p99(&all[0]), Some(p99(&all[1])))
        .baseline("bare axum long-poll on tokio watch", median(&all[1]))
        .note(format!(
            "{readers} keep-alive connections block on `GET /v1/kv/wake?cached&index=N&wait=60s`, \
             then one `PUT` through the agent: PUT sent → last reader's response read; median \
             and p99 over {wake_rounds} rounds. Baseline: an axum handler waiting on a \
             tokio::sync::watch, bumped by its PUT handler"
        )),
    );
    figures.push(
        Figure::new(
            format!("agent/blocking wake-up, {readers} readers, each"),
            median(&each[0]),
            "ms",
        )
        .p99(p99(&each[0]), Some(p99(&each[1])))
        .baseline("bare axum long-poll on tokio watch", median(&each[1]))
        .note("as above, every reader's latency pooled over rounds"),
    );

    driver.block_on(async {
        drop(pools);
    });
    server_rt
        .block_on(agent.shutdown())
        .expect("agent shuts down");
    drop(server_rt);
    figures
}
