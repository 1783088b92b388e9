//! Real etcd processes for the etcd tests: a cluster of one or more members on free loopback
//! ports with temporary data directories (on `/dev/shm` when it exists, so fsync is cheap),
//! killed and removed on drop, also when a test panics. Plus a tiny direct etcd client (not
//! the agent's), so tests can write "behind the agent's back" and read the truth.
//!
//! Include it with `#[path = "common/etcd.rs"] mod etcd;` next to `mod common;`.
//!
//! Without an `etcd` binary the tests print a `SKIP` line straight to stderr (not captured by
//! the test harness, so it shows in `cargo test` output) and return; with
//! `DEMO_AGENT_REQUIRE_ETCD=1` (set by `.ci/run`) a missing binary fails them instead.

#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use demo_agent::{Config, KvCacheMode, UpstreamKind};
use serde_json::{Value, json};

use crate::common::{self, TestAgent};

/// How long a cluster may take to come up (elect a leader, answer `/health`).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The etcd binary: `$ETCD_BIN`, else `etcd` on `PATH`.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ETCD_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
}

/// Whether etcd is available for `test`; prints a loud SKIP line when it is not (or panics
/// when `DEMO_AGENT_REQUIRE_ETCD` is set).
pub fn available(test: &str) -> bool {
    if etcd_binary().is_some() {
        return true;
    }
    let how = "install it with `sudo apt-get install etcd-server` (Debian/Ubuntu) or set \
               ETCD_BIN=/path/to/etcd";
    if std::env::var_os("DEMO_AGENT_REQUIRE_ETCD").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{test}: etcd is required (DEMO_AGENT_REQUIRE_ETCD is set) but not found: {how}");
    }
    // Straight to the process's stderr: libtest captures `eprintln!`, not this.
    let line = format!("\nSKIP {test}: the `etcd` binary is not on PATH; {how}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}

/// One member's fixed parts (restarting it reuses them).
#[derive(Debug, Clone)]
struct MemberSpec {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    tls: bool,
}

impl MemberSpec {
    fn client_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A running (or stopped) etcd cluster of local processes.
pub struct EtcdCluster {
    root: PathBuf,
    token: String,
    specs: Vec<MemberSpec>,
    children: Vec<Option<Child>>,
    http: reqwest::Client,
    tls: Option<Tls>,
    /// `(user, password)` for etcdctl once authentication is on.
    auth: Option<(String, String)>,
}

/// TLS material generated for a cluster (PEM files in its scratch directory): a CA, the
/// members' certificate (for 127.0.0.1) and a client certificate, all signed by the CA.
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Tls {
    fn generate(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            fs::write(&path, pem).expect("write a PEM file");
            path
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(DnType::CommonName, "demo-agent test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf = |sans: Vec<String>, cn: &str, usage: Vec<ExtendedKeyUsagePurpose>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = usage;
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            "etcd",
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let (client_cert, client_key) = leaf(
            Vec::new(),
            "demo-agent",
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        Self {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server_cert),
            server_key: write("server-key.pem", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client-key.pem", client_key),
        }
    }
}

/// The etcdctl binary: `$ETCDCTL_BIN`, else `etcdctl` on `PATH`.
pub fn etcdctl_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ETCDCTL_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcdctl"))
        .find(|candidate| candidate.is_file())
}

/// Whether etcdctl is available for `test` (as [`available`] for etcd; call both, so that
/// `cargo xtask test` names the test among those skipped without etcd).
pub fn etcdctl_available(test: &str) -> bool {
    if etcdctl_binary().is_some() {
        return true;
    }
    let how = "install it with `sudo apt-get install etcd-client` or set ETCDCTL_BIN";
    if std::env::var_os("DEMO_AGENT_REQUIRE_ETCD").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{test}: etcdctl is required (DEMO_AGENT_REQUIRE_ETCD is set) but not found: {how}");
    }
    let line = format!("\nSKIP {test}: the `etcdctl` binary is not on PATH; {how}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}

static CLUSTERS: AtomicU64 = AtomicU64::new(0);

fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() && fs::metadata(shm).is_ok_and(|m| !m.permissions().readonly()) {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base.join(format!(
        "demo-agent-etcd-{}-{n}-{nanos}",
        std::process::id()
    ))
}

/// `count` distinct free loopback ports (all held open until every one is chosen).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl EtcdCluster {
    /// Starts a cluster of `members` members and waits until it answers (bounded).
    pub async fn start(members: usize) -> Self {
        let mut last_error = String::new();
        // A port can be taken between choosing and binding it: retry with fresh ports.
        for _ in 0..3 {
            let mut cluster = Self::spawn(members, free_ports(2 * members), None, false);
            match cluster.wait_ready().await {
                Ok(()) => return cluster,
                Err(error) => last_error = error,
            }
        }
        panic!("etcd cluster did not start: {last_error}");
    }

    /// Starts a single-member cluster whose client URL is `https://` (certificates generated
    /// for the test, see [`Tls`]) and which requires client certificates.
    pub async fn start_tls() -> Self {
        let mut last_error = String::new();
        for _ in 0..3 {
            let mut cluster = Self::spawn(1, free_ports(2), None, true);
            match cluster.wait_ready().await {
                Ok(()) => return cluster,
                Err(error) => last_error = error,
            }
        }
        panic!("etcd TLS cluster did not start: {last_error}");
    }

    /// Starts a fresh single-member cluster (new data dir, revision 1) on the given client
    /// and peer ports: "another cluster behind the same endpoint".
    pub async fn start_on_ports(client_port: u16, peer_port: u16) -> Self {
        let mut cluster = Self::spawn(1, vec![client_port, peer_port], None, false);
        if let Err(error) = cluster.wait_ready().await {
            panic!("etcd did not start on port {client_port}: {error}");
        }
        cluster
    }

    fn spawn(members: usize, ports: Vec<u16>, root: Option<PathBuf>, tls: bool) -> Self {
        let root = root.unwrap_or_else(scratch_root);
        fs::create_dir_all(&root).expect("create the etcd scratch directory");
        let tls = tls.then(|| Tls::generate(&root));
        let specs: Vec<MemberSpec> = (0..members)
            .map(|i| MemberSpec {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: root.join(format!("m{i}.etcd")),
                log: root.join(format!("m{i}.log")),
                tls: tls.is_some(),
            })
            .collect();
        let token = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cluster = Self {
            root,
            token,
            children: specs.iter().map(|_| None).collect(),
            specs,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .no_proxy()
                .build()
                .unwrap(),
            tls,
            auth: None,
        };
        for i in 0..members {
            cluster.spawn_member(i);
        }
        cluster
    }

    fn spawn_member(&mut self, i: usize) {
        let spec = &self.specs[i];
        let initial_cluster = self
            .specs
            .iter()
            .map(|s| format!("{}={}", s.name, s.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .expect("open the etcd log");
        let mut command = Command::new(etcd_binary().expect("etcd binary"));
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &spec.name])
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .args(["--listen-client-urls", &spec.client_url()])
            .args(["--advertise-client-urls", &spec.client_url()])
            .args(["--listen-peer-urls", &spec.peer_url()])
            .args(["--initial-advertise-peer-urls", &spec.peer_url()])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Fast elections: a killed leader is replaced in about a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.children[i] = Some(child);
    }

    /// Waits until every running member answers `/health` with a leader.
    pub async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for i in 0..self.specs.len() {
            if self.children[i].is_none() {
                continue;
            }
            loop {
                if let Some(Ok(Some(status))) = self.children[i].as_mut().map(Child::try_wait) {
                    self.children[i] = None;
                    return Err(format!(
                        "member {i} exited with {status}; log:\n{}",
                        self.log_tail(i)
                    ));
                }
                if self.tls.is_some() {
                    let health = self.etcdctl_on(i, &["endpoint", "health"]);
                    if health.status.success() {
                        break;
                    }
                } else if let Ok(response) = self
                    .http
                    .get(format!("{}/health", self.specs[i].client_url()))
                    .send()
                    .await
                {
                    if let Ok(body) = response.json::<Value>().await {
                        if body["health"] == "true" {
                            break;
                        }
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "member {i} not healthy in time; log:\n{}",
                        self.log_tail(i)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// The client URLs of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.specs.iter().map(MemberSpec::client_url).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        self.specs[i].client_url()
    }

    /// Member `i`'s client and peer ports.
    pub fn ports(&self, i: usize) -> (u16, u16) {
        (self.specs[i].client_port, self.specs[i].peer_port)
    }

    /// Kills member `i` (SIGKILL: a crash, no goodbye); its data dir stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts member `i` on its data dir and ports, and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn_member(i);
        if let Err(error) = self.wait_ready().await {
            panic!("etcd member {i} did not restart: {error}");
        }
    }

    /// Restarts member `i` on its data dir with another client port (its peer port stays),
    /// and waits until it is healthy.
    pub async fn restart_on_client_port(&mut self, i: usize, client_port: u16) {
        self.kill(i);
        self.specs[i].client_port = client_port;
        self.spawn_member(i);
        if let Err(error) = self.wait_ready().await {
            panic!("etcd member {i} did not restart on port {client_port}: {error}");
        }
    }

    /// Freezes member `i` (SIGSTOP): its process and sockets stay, it answers nothing.
    pub fn freeze(&self, i: usize) {
        self.signal(i, "STOP");
    }

    /// Thaws member `i` (SIGCONT).
    pub fn thaw(&self, i: usize) {
        self.signal(i, "CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.children[i].as_ref().expect("a running member").id();
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{signal} {pid}"))
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// The TLS material, for a cluster started with [`EtcdCluster::start_tls`].
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// Runs etcdctl (API v3) against member `i` with the cluster's TLS and auth, and returns
    /// its output.
    pub fn etcdctl_on(&self, i: usize, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(etcdctl_binary().expect("etcdctl binary"));
        command
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.specs[i].client_url())
            .args(["--dial-timeout", "2s", "--command-timeout", "5s"]);
        if let Some(tls) = &self.tls {
            command
                .arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key);
        }
        if let Some((user, password)) = &self.auth {
            command.arg("--user").arg(format!("{user}:{password}"));
        }
        command.args(args).output().expect("run etcdctl")
    }

    /// Runs etcdctl on the first running member and asserts it succeeded; its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Vec<u8> {
        let output = self.etcdctl_on(self.running_member(), args);
        assert!(
            output.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// Turns etcd's authentication on with a `root` user whose password is `password`.
    pub fn enable_auth(&mut self, password: &str) {
        self.etcdctl(&["user", "add", &format!("root:{password}")]);
        self.etcdctl(&["auth", "enable"]);
        self.auth = Some(("root".to_owned(), password.to_owned()));
    }

    fn log_tail(&self, i: usize) -> String {
        let text = fs::read_to_string(&self.specs[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    // ===== a direct client (not the agent's) =====

    async fn call(&self, member: usize, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.specs[member].client_url());
        let response = self.http.post(&url).json(&body).send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "{url}: {status} {body}");
        body
    }

    /// Writes `key` directly through member `member`; the write's revision.
    pub async fn put_via(&self, member: usize, key: &str, value: &str) -> u64 {
        let body = self
            .call(
                member,
                "/v3/kv/put",
                json!({"key": BASE64.encode(key), "value": BASE64.encode(value)}),
            )
            .await;
        int64(&body["header"]["revision"])
    }

    /// Writes `key` directly through member `member`, retrying for up to 20 s while the
    /// cluster cannot take it (an election after a member froze or died).
    pub async fn put_via_retrying(&self, member: usize, key: &str, value: &str) -> u64 {
        let url = format!("{}/v3/kv/put", self.specs[member].client_url());
        let body = json!({"key": BASE64.encode(key), "value": BASE64.encode(value)});
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = self.http.post(&url).json(&body).send().await {
                if response.status().is_success() {
                    if let Ok(body) = response.json::<Value>().await {
                        return int64(&body["header"]["revision"]);
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {member} kept refusing a put"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes `key` directly through the first running member.
    pub async fn put(&self, key: &str, value: &str) -> u64 {
        self.put_via(self.running_member(), key, value).await
    }

    /// The value and `mod_revision` of `key`, read directly.
    pub async fn get(&self, key: &str) -> Option<(String, u64)> {
        let body = self
            .call(
                self.running_member(),
                "/v3/kv/range",
                json!({"key": BASE64.encode(key)}),
            )
            .await;
        body["kvs"]
            .as_array()
            .and_then(|kvs| kvs.first())
            .map(|kv| {
                (
                    String::from_utf8(BASE64.decode(kv["value"].as_str().unwrap_or("")).unwrap())
                        .unwrap(),
                    int64(&kv["mod_revision"]),
                )
            })
    }

    /// Every key under `prefix` with its value, read directly, in key order.
    pub async fn list(&self, prefix: &str) -> Vec<(String, String)> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        let body = self
            .call(
                self.running_member(),
                "/v3/kv/range",
                json!({"key": BASE64.encode(prefix), "range_end": BASE64.encode(&end)}),
            )
            .await;
        let decode = |v: &Value| {
            String::from_utf8(BASE64.decode(v.as_str().unwrap_or("")).unwrap()).unwrap()
        };
        body["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| (decode(&kv["key"]), decode(&kv["value"])))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The store's current revision.
    pub async fn revision(&self) -> u64 {
        let body = self
            .call(
                self.running_member(),
                "/v3/kv/range",
                json!({"key": BASE64.encode("\0"), "count_only": true}),
            )
            .await;
        int64(&body["header"]["revision"])
    }

    /// Compacts the history up to `revision` (physically, before answering).
    pub async fn compact(&self, revision: u64) {
        self.call(
            self.running_member(),
            "/v3/kv/compaction",
            json!({"revision": revision.to_string(), "physical": true}),
        )
        .await;
    }

    fn running_member(&self) -> usize {
        self.children
            .iter()
            .position(Option::is_some)
            .expect("a running etcd member")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for i in 0..self.specs.len() {
            if panicking {
                let tail = self.log_tail(i);
                if !tail.is_empty() {
                    let _ = std::io::stderr().write_all(
                        format!("--- etcd member {i} log (last lines) ---\n{tail}\n").as_bytes(),
                    );
                }
            }
            self.kill(i);
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn int64(v: &Value) -> u64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
        .unwrap_or(0)
}

/// An agent on `endpoints` with `mode` and a short etcd request timeout.
pub fn etcd_config(endpoints: Vec<String>, mode: KvCacheMode) -> Config {
    let mut config = common::config_with_mode(mode);
    config.upstream = UpstreamKind::Etcd;
    config.etcd_endpoints = endpoints;
    config.etcd_timeout = Duration::from_secs(2);
    config
}

/// Starts an agent on `cluster`'s endpoints.
pub async fn start_agent(cluster: &EtcdCluster, mode: KvCacheMode) -> TestAgent {
    common::start(etcd_config(cluster.endpoints(), mode)).await
}
