//! The web view (`/ui/`) in a real browser: headless Chromium driven by chromedriver over
//! the WebDriver protocol (a small client on reqwest, below). The tests read the **rendered
//! DOM** after the page's script ran: entries appear after a write and a cached read, the
//! upstream turns unreachable during an injected outage and reachable after it, paging,
//! sorting and the prefix filter work, and 100 000 entries page without stalling the page.
//!
//! Without `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`)
//! the tests print `SKIP` and pass; with `DEMO_AGENT_REQUIRE_CHROMIUM=1` (set by `.ci/run`) a
//! missing browser fails them. `CHROMIUM_BIN` and `CHROMEDRIVER_BIN` override the lookup.
//!
//! `UI_SCREENSHOT=$PWD/docs/ui.png cargo test -p demo-agent --test ui_browser -- under_traffic`
//! retakes the README's screenshot (1280×900) with a minute of live traffic and failures.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestAgent, start_default, start_simple};
use demo_agent::types::{KvRequest, KvType, ReadOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The bound on each browser test (a cold browser start takes a few seconds).
const BROWSER_TEST_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the page may take to show a change (it polls once a second).
const SHOW_TIMEOUT: Duration = Duration::from_secs(20);

async fn bounded_browser<F: std::future::Future<Output = ()>>(body: F) {
    tokio::time::timeout(BROWSER_TEST_TIMEOUT, body)
        .await
        .expect("browser test exceeded its time bound");
}

/// Finding Chromium and chromedriver, and the skip rule.
mod browser {
    use std::io::Write as _;
    use std::path::PathBuf;

    fn on_path(names: &[&str]) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
            .find(|candidate| candidate.is_file())
    }

    fn from_env(var: &str) -> Option<PathBuf> {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    }

    /// The browser: `$CHROMIUM_BIN`, else `chromium` (Debian) or `chromium-browser` on PATH.
    pub(crate) fn chromium() -> Option<PathBuf> {
        from_env("CHROMIUM_BIN").or_else(|| on_path(&["chromium", "chromium-browser"]))
    }

    /// The driver: `$CHROMEDRIVER_BIN`, else `chromedriver` on PATH.
    pub(crate) fn chromedriver() -> Option<PathBuf> {
        from_env("CHROMEDRIVER_BIN").or_else(|| on_path(&["chromedriver"]))
    }

    /// Whether the browser tests can run for `test`; prints a loud SKIP line when they
    /// cannot (or panics when `DEMO_AGENT_REQUIRE_CHROMIUM` is set).
    pub(crate) fn available(test: &str) -> bool {
        let missing: Vec<&str> = [
            ("chromium", chromium().is_none()),
            ("chromedriver", chromedriver().is_none()),
        ]
        .into_iter()
        .filter_map(|(name, absent)| absent.then_some(name))
        .collect();
        if missing.is_empty() {
            return true;
        }
        let how = "install them with `sudo apt-get install chromium chromium-driver` (Debian) \
                   or set CHROMIUM_BIN and CHROMEDRIVER_BIN";
        let what = missing.join(" and ");
        if std::env::var_os("DEMO_AGENT_REQUIRE_CHROMIUM")
            .is_some_and(|v| !v.is_empty() && v != "0")
        {
            panic!(
                "{test}: {what} required (DEMO_AGENT_REQUIRE_CHROMIUM is set) but not found: {how}"
            );
        }
        // Straight to the process's stderr: libtest captures `eprintln!`, not this.
        let line = format!("\nSKIP {test}: {what} not on PATH; {how}\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        false
    }
}

/// A fresh, empty directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("demo-agent-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The W3C WebDriver element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session through a chromedriver process (both end on drop: the
/// session is deleted, then the driver killed).
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session of `width`×`height`.
    async fn start(width: u32, height: u32) -> Self {
        let driver_bin = browser::chromedriver().expect("chromedriver");
        let mut driver = Command::new(driver_bin)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        // "ChromeDriver was started successfully on port 39489."
        let stdout = driver.stdout.take().expect("chromedriver stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read chromedriver output") {
                if let Some(rest) = line.split("on port ").nth(1) {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    if line.contains("successfully") {
                        return digits.parse::<u16>().expect("chromedriver's port");
                    }
                }
            }
            panic!("chromedriver exited before it listened");
        })
        .await
        .expect("chromedriver listens within 30s");
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let profile = TempDir::new("chromium");
        let mut args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--hide-scrollbars".to_owned(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.0.display()),
        ];
        args.push("--lang=en-US".to_owned());
        let mut options = json!({ "args": args });
        if let Some(binary) = browser::chromium() {
            options["binary"] = json!(binary.display().to_string());
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&json!({
                "capabilities": { "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": options,
                }}
            }))
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("a JSON answer");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"))
            .to_owned();
        let browser = Self {
            driver,
            base,
            session,
            http,
            _profile: profile,
        };
        // `--window-size` sizes the window; make the page's viewport that size instead.
        let frame = browser
            .eval(
                "return [window.outerWidth - window.innerWidth, \
                 window.outerHeight - window.innerHeight]",
            )
            .await;
        let extra = |i: usize| u32::try_from(frame[i].as_u64().unwrap_or(0)).unwrap_or(0);
        browser
            .command(
                reqwest::Method::POST,
                "/window/rect",
                Some(json!({ "width": width + extra(0), "height": height + extra(1) })),
            )
            .await;
        browser
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("chromedriver answers");
        let status = response.status();
        let answer: Value = response.json().await.expect("a JSON answer");
        assert!(status.is_success(), "WebDriver {path}: {status} {answer}");
        answer["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn current_url(&self) -> String {
        let url = self.command(reqwest::Method::GET, "/url", None).await;
        url.as_str().unwrap_or_default().to_owned()
    }

    /// Runs `script` (a function body; `return` its answer) in the page.
    async fn eval(&self, script: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_owned()
    }

    /// Clicks the element `css` as a user would (WebDriver element click).
    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Types `text` into the element `css` (WebDriver send keys).
    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn screenshot_png(&self) -> Vec<u8> {
        use base64::Engine as _;
        let data = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("base64 PNG"))
            .expect("valid base64")
    }

    /// Evaluates `script` until `done` accepts its answer; panics after [`SHOW_TIMEOUT`] with
    /// the last answer and the page's text.
    async fn wait_for(&self, what: &str, script: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + SHOW_TIMEOUT;
        loop {
            let value = self.eval(script).await;
            if done(&value) {
                return value;
            }
            if Instant::now() > deadline {
                let text = self.eval("return document.body.innerText").await;
                panic!("the page did not show {what}: last {value}\n--- page text ---\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the session (the browser exits) and the driver.
    async fn close(mut self) {
        let url = format!("{}/session/{}", self.base, self.session);
        if self.http.delete(url).send().await.is_ok() {
            self.session.clear();
        }
        let _ = self.driver.kill().await;
    }
}

impl Drop for Browser {
    /// A test that panicked still ends its browser: a blocking `DELETE` of the session before
    /// the driver is killed (killing only the driver would leave Chromium running).
    fn drop(&mut self) {
        use std::io::{Read as _, Write as _};
        if self.session.is_empty() {
            return;
        }
        let address = self.base.trim_start_matches("http://").to_owned();
        let Ok(mut stream) = std::net::TcpStream::connect(&address) else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.session
        );
        if stream.write_all(request.as_bytes()).is_ok() {
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
        }
    }
}

/// The keys of the entry rows shown, in order.
const ROW_KEYS: &str =
    "return [...document.querySelectorAll('#entries-body tr')].map(r => r.dataset.key)";
/// The upstream pill: its reachability attribute and text.
const UPSTREAM: &str = "const p = document.getElementById('upstream-pill'); \
                        return { reachable: p.dataset.reachable, text: p.textContent }";
/// The pager's text.
const RANGE: &str = "return document.getElementById('range').textContent";

/// One row's cells by column name, or null.
fn row_script(key: &str) -> String {
    format!(
        "const r = [...document.querySelectorAll('#entries-body tr')].find(r => r.dataset.key === {key}); \
         if (!r) return null; \
         const c = [...r.cells].map(td => td.textContent); \
         return {{ key: c[0], index: c[1], age: c[2], result: c[3], watchers: c[4], backoff: c[5], ttl: c[6], failing: r.classList.contains('failing') }};",
        key = json!(key)
    )
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `key` through the agent and returns its index (the `ModifyIndex` of a read of it).
async fn write(t: &TestAgent, key: &str, value: &str) -> u64 {
    let response = t.put_body(&format!("/v1/kv/{key}"), value.to_owned()).await;
    assert!(
        response.status().is_success(),
        "PUT {key}: {}",
        response.status()
    );
    let read = t.get(&format!("/v1/kv/{key}")).await;
    assert!(read.status().is_success(), "GET {key}: {}", read.status());
    let body: Value = read.json().await.expect("a JSON read");
    body[0]["ModifyIndex"].as_u64().expect("ModifyIndex")
}

/// A cached read through the agent, to create (or hit) the key's entry.
async fn cached_read(t: &TestAgent, key: &str) {
    let response = t.get(&format!("/v1/kv/{key}?cached")).await;
    assert!(
        response.status().is_success() || response.status() == reqwest::StatusCode::NOT_FOUND,
        "cached read of {key}: {}",
        response.status()
    );
}

/// Without a browser: the page and its assets are served, `/` sends only browsers to it, and
/// the JSON endpoint answers one bounded page and rejects bad parameters.
#[tokio::test]
async fn the_page_and_its_endpoint_over_plain_http() {
    bounded_browser(async {
        let t = start_simple().await;
        for (path, content_type, needle) in [
            ("/ui/", "text/html", "<table"),
            ("/ui/app.js", "text/javascript", "/v1/agent/cache"),
            ("/ui/style.css", "text/css", "table.grid"),
        ] {
            let response = t.get(path).await;
            assert_eq!(response.status(), reqwest::StatusCode::OK, "{path}");
            assert!(common::header(&response, "content-type").starts_with(content_type));
            assert!(response.text().await.unwrap().contains(needle), "{path}");
        }
        let no_redirects = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let browser_root = no_redirects
            .get(t.url("/"))
            .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
            .send()
            .await
            .unwrap();
        assert!(browser_root.status().is_redirection());
        assert_eq!(common::header(&browser_root, "location"), "/ui/");
        let script_root = t.get("/").await;
        assert_eq!(script_root.status(), reqwest::StatusCode::NOT_FOUND);
        assert!(common::header(&script_root, "content-type").starts_with("application/json"));

        for i in 0..700 {
            cached_read(&t, &format!("bulk/{i:04}")).await;
        }
        let view: Value = t
            .get("/v1/agent/cache?limit=100000")
            .await
            .json()
            .await
            .unwrap();
        let entries = &view["entries"];
        assert_eq!(entries["total"], 700);
        assert_eq!(entries["limit"], 500, "the page size is capped");
        assert_eq!(entries["items"].as_array().unwrap().len(), 500);
        assert_eq!(entries["items"][0]["key"], "bulk/0000");
        let kv = view["types"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["name"] == "kv")
            .expect("a kv row");
        assert_eq!(kv["entries"], 700);
        assert_eq!(view["upstream"]["reachable"], true);
        let last: Value = t
            .get("/v1/agent/cache?sort=key&order=desc&offset=699&limit=10")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(last["entries"]["items"][0]["key"], "bulk/0000");
        // A page in the second half, read from the other end and turned around.
        let deep: Value = t
            .get("/v1/agent/cache?offset=400&limit=3")
            .await
            .json()
            .await
            .unwrap();
        let keys: Vec<&str> = deep["entries"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["bulk/0400", "bulk/0401", "bulk/0402"]);
        let far: Value = t
            .get("/v1/agent/cache?offset=18446744073709551615")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(far["entries"]["items"], json!([]));
        for bad in [
            "type=nope",
            "sort=size",
            "order=up",
            "limit=-1",
            "offset=x",
            "limit=99999999999999999999999",
        ] {
            let response = t.get(&format!("/v1/agent/cache?{bad}")).await;
            assert_eq!(response.status(), reqwest::StatusCode::BAD_REQUEST, "{bad}");
        }
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn the_page_shows_entries_and_the_upstream_through_an_outage() {
    if !browser::available("the_page_shows_entries_and_the_upstream_through_an_outage") {
        return;
    }
    bounded_browser(async {
        let t = start_default().await;
        let browser = Browser::start(1280, 900).await;

        // A browser asking for `/` lands on the web view.
        browser.goto(&t.url("/")).await;
        assert!(
            browser.current_url().await.ends_with("/ui/"),
            "redirected to /ui/, at {}",
            browser.current_url().await
        );
        browser
            .wait_for(
                "a first poll",
                "return document.getElementById('poll-status').textContent",
                |v| v.as_str().is_some_and(|s| s.starts_with("updated")),
            )
            .await;

        // A write and a cached read: the entry appears, with its index and a good result.
        let index = write(&t, "ui/alpha", "1").await;
        cached_read(&t, "ui/alpha").await;
        let row = browser
            .wait_for("the entry ui/alpha", &row_script("ui/alpha"), |v| {
                !v.is_null()
            })
            .await;
        assert_eq!(row["index"], json!(index.to_string()), "{row}");
        assert_eq!(row["result"], "ok", "{row}");
        assert_eq!(row["failing"], false, "{row}");
        // The type's row counts it.
        browser
            .wait_for(
                "kv's entry count",
                "return document.querySelector('#types-body tr[data-type=kv]').cells[1].textContent",
                |v| v == "1",
            )
            .await;
        browser
            .wait_for("the upstream reachable", UPSTREAM, |v| {
                v["reachable"] == "true"
            })
            .await;

        // An outage: the upstream turns unreachable, and the entry's refresh fails.
        t.set_fail(true).await;
        let up = browser
            .wait_for("the upstream unreachable", UPSTREAM, |v| {
                v["reachable"] == "false"
            })
            .await;
        assert!(
            up["text"].as_str().unwrap().contains("unreachable"),
            "{up}"
        );
        let row = browser
            .wait_for("ui/alpha failing", &row_script("ui/alpha"), |v| {
                v["failing"] == true
            })
            .await;
        assert!(row["result"].as_str().unwrap().contains("error"), "{row}");
        let status = browser
            .eval("return document.getElementById('up-status').textContent")
            .await;
        assert_eq!(status, "unreachable");

        // The outage ends: reachable again.
        t.set_fail(false).await;
        let up = browser
            .wait_for("the upstream reachable again", UPSTREAM, |v| {
                v["reachable"] == "true"
            })
            .await;
        assert!(up["text"].as_str().unwrap().ends_with("reachable"), "{up}");
        let outage = browser
            .eval("return document.getElementById('up-outage').textContent")
            .await;
        assert!(
            outage.as_str().unwrap().starts_with("none"),
            "no outage shown once contact is back: {outage}"
        );
        // The entry's retried fetch reaches the upstream: its row is healthy again.
        browser
            .wait_for("ui/alpha recovered", &row_script("ui/alpha"), |v| {
                v["failing"] == false && v["result"] == "ok" && v["backoff"] == "–"
            })
            .await;

        browser.close().await;
        t.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn the_entries_table_pages_sorts_and_filters() {
    if !browser::available("the_entries_table_pages_sorts_and_filters") {
        return;
    }
    bounded_browser(async {
        let t = start_simple().await;
        // 250 keys under page/, 5 under other/ (written last).
        let mut last_index = 0;
        for i in 0..250 {
            let key = format!("page/k{i:03}");
            write(&t, &key, "v").await;
            cached_read(&t, &key).await;
        }
        for i in 0..5 {
            let key = format!("other/{i}");
            last_index = write(&t, &key, "v").await;
            cached_read(&t, &key).await;
        }
        let browser = Browser::start(1280, 900).await;
        browser.goto(&t.url("/ui/")).await;
        browser
            .wait_for("the first page", RANGE, |v| v == "1–100 of 255")
            .await;
        let keys = strings(&browser.eval(ROW_KEYS).await);
        assert_eq!(keys.len(), 100);
        assert_eq!(keys[0], "other/0", "key order");
        assert_eq!(keys[5], "page/k000");

        browser.click("#next").await;
        browser
            .wait_for("the second page", RANGE, |v| v == "101–200 of 255")
            .await;
        let keys = strings(&browser.eval(ROW_KEYS).await);
        assert_eq!(keys[0], "page/k095");
        browser.click("#last").await;
        browser
            .wait_for("the last page", RANGE, |v| v == "201–255 of 255")
            .await;
        // (Read from the other end of the order by the agent, and turned around.)
        let keys = strings(&browser.eval(ROW_KEYS).await);
        assert_eq!(keys.len(), 55);
        assert_eq!(keys[0], "page/k195");
        assert_eq!(keys[54], "page/k249");

        // Highest index first.
        browser.click("th[data-sort=index]").await;
        let keys = browser
            .wait_for("index order", ROW_KEYS, |v| {
                strings(v).first().is_some_and(|k| k == "other/4")
            })
            .await;
        assert_eq!(strings(&keys)[1], "other/3");
        let first_index = browser
            .eval("return document.querySelector('#entries-body tr').cells[1].textContent")
            .await;
        assert_eq!(first_index, json!(last_index.to_string()));

        // The prefix filter.
        browser.type_into("#prefix", "other/").await;
        let keys = browser
            .wait_for("only other/", ROW_KEYS, |v| strings(v).len() == 5)
            .await;
        assert!(strings(&keys).iter().all(|k| k.starts_with("other/")));
        assert_eq!(browser.eval(RANGE).await, "1–5 of 5");

        browser.close().await;
        t.shutdown().await;
    })
    .await;
}

/// Fills the KV cache (in simple mode: no background refresh, so no blocking query per entry)
/// with `n` entries through the cache API in-process (an HTTP request per
/// entry would take most of the test's time), `page/000000` … in key order.
async fn fill(t: &TestAgent, n: usize) {
    let kv = t
        .agent
        .state()
        .cache()
        .typed::<KvType>()
        .expect("the KV type is registered");
    let kv = Arc::new(kv);
    let mut tasks = Vec::new();
    let workers = 8;
    for w in 0..workers {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(workers) {
                let request = KvRequest {
                    key: format!("many/{i:06}"),
                    read: ReadOptions {
                        cached: true,
                        ..ReadOptions::default()
                    },
                };
                kv.get(&request).await.expect("a cached read");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_entries_page_without_stalling_the_page() {
    if !browser::available("a_hundred_thousand_entries_page_without_stalling_the_page") {
        return;
    }
    bounded_browser(async {
        const N: usize = 100_000;
        let t = start_simple().await;
        let filled = Instant::now();
        fill(&t, N).await;
        eprintln!("filled {N} entries in {:?}", filled.elapsed());

        let browser = Browser::start(1280, 900).await;
        browser.goto(&t.url("/ui/")).await;
        browser
            .wait_for("the first page of 100,000", RANGE, |v| {
                v == "1–100 of 100,000"
            })
            .await;
        browser.click("#last").await;
        browser
            .wait_for("the last page", RANGE, |v| v == "99,901–100,000 of 100,000")
            .await;
        let keys = strings(&browser.eval(ROW_KEYS).await);
        assert_eq!(keys.last().map(String::as_str), Some("many/099999"));
        // The table holds one page, never all entries.
        assert_eq!(keys.len(), 100);
        browser.type_into("#prefix", "many/0999").await;
        browser
            .wait_for("the filtered page", RANGE, |v| v == "1–100 of 100")
            .await;

        // The page stays responsive: its polls (one page each) answer quickly, and a script
        // runs at once between them.
        let timings = browser
            .eval(
                "return performance.getEntriesByType('resource') \
                 .filter(e => e.name.includes('/v1/agent/cache')).map(e => e.duration)",
            )
            .await;
        let mut timings: Vec<f64> = timings
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        timings.sort_by(f64::total_cmp);
        let median = timings[timings.len() / 2];
        let worst = timings.last().copied().unwrap_or_default();
        eprintln!(
            "{} polls of /v1/agent/cache over {N} entries: median {median:.0} ms, worst {worst:.0} ms",
            timings.len()
        );
        assert!(median < 1000.0, "median poll {median} ms");
        let started = Instant::now();
        browser.eval("return 1").await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the page's main thread answered a script in {:?}",
            started.elapsed()
        );

        browser.close().await;
        t.shutdown().await;
    })
    .await;
}

/// The page under live traffic (reads, writes, open watches, a short outage, a random failure
/// rate) shows it, and a 1280×900 screenshot of it is a real picture. With `UI_SCREENSHOT=PATH`
/// the scenario runs two and a half minutes (so the chart has history), waits for a failing
/// entry, and writes the screenshot there: that is how `docs/ui.png` is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_under_traffic_with_a_screenshot() {
    if !browser::available("the_page_under_traffic_with_a_screenshot") {
        return;
    }
    let path = std::env::var_os("UI_SCREENSHOT").map(PathBuf::from);
    // A short run in the test matrix; a longer one for the README's picture.
    let (before, outage, after) = if path.is_some() {
        (90, 5, 60)
    } else {
        (3, 2, 3)
    };
    let bound = BROWSER_TEST_TIMEOUT + Duration::from_secs(before + outage + after);
    tokio::time::timeout(bound, under_traffic(path, before, outage, after))
        .await
        .expect("the traffic test exceeded its time bound");
}

/// The body of [`the_page_under_traffic_with_a_screenshot`]: phases in seconds.
async fn under_traffic(path: Option<PathBuf>, before: u64, outage: u64, after: u64) {
    let t = Arc::new(start_default().await);
    let keys = [
        "config/billing/feature-flags",
        "config/billing/rate-limit",
        "config/checkout/timeouts",
        "config/search/replicas",
        "service/api/leader",
        "service/api/version",
        "service/payments/endpoint",
        "service/search/shards",
        "tenants/acme/quota",
        "tenants/globex/quota",
        "tenants/initech/quota",
    ];
    for key in keys {
        write(&t, key, "v1").await;
        cached_read(&t, key).await;
    }
    // Watches on one stream, as a sidecar would open them.
    let watch = t
        .client
        .get(t.url("/v1/watch?key=service/api/leader&prefix=config/"))
        .send()
        .await
        .unwrap();
    assert!(watch.status().is_success());
    // Live traffic: reads all the time, a write now and then.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (t, stop) = (t.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                for key in keys {
                    cached_read(&t, key).await;
                }
                if n % 20 == 0 {
                    let key = keys[usize::try_from(n / 20).unwrap() % keys.len()];
                    let _ = t.put_body(&format!("/v1/kv/{key}"), format!("v{n}")).await;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let browser = Browser::start(1280, 900).await;
    browser.goto(&t.url("/ui/")).await;
    tokio::time::sleep(Duration::from_secs(before)).await;
    t.set_fail(true).await;
    tokio::time::sleep(Duration::from_secs(outage)).await;
    t.set_fail(false).await;
    tokio::time::sleep(Duration::from_secs(after)).await;
    // Failures now and then while the upstream stays reachable.
    let rate = if path.is_some() { "0.3" } else { "0.05" };
    let response = t
        .put_no_body(&format!("/v1/agent/upstream?fail_rate={rate}"))
        .await;
    assert!(response.status().is_success());
    if path.is_some() {
        // The picture shows a failing entry among healthy ones.
        browser
            .wait_for(
                "a failing entry",
                "return document.querySelectorAll('#entries-body tr.failing').length",
                |v| v.as_u64().is_some_and(|n| n >= 1),
            )
            .await;
    }

    // What the page shows: the open stream and its watches, hits per second, the chart.
    browser
        .wait_for(
            "one SSE stream",
            "return document.getElementById('sse-streams').textContent",
            |v| v == "1",
        )
        .await;
    browser
        .wait_for(
            "the stream's two watches",
            "return document.getElementById('watches').textContent",
            |v| v == "2",
        )
        .await;
    browser
        .wait_for(
            "hits per second",
            "return Number(document.getElementById('rate-hits').textContent)",
            |v| v.as_f64().is_some_and(|hits| hits > 0.0),
        )
        .await;
    let points = browser
        .eval(
            "return document.getElementById('spark-hits').getAttribute('points').split(' ').length",
        )
        .await;
    assert!(
        points.as_u64().is_some_and(|n| n >= 3),
        "chart points: {points}"
    );
    browser
        .wait_for("every key listed", ROW_KEYS, |v| {
            strings(v).len() == keys.len()
        })
        .await;
    // One more poll, so the picture is of a settled page.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let png = browser.screenshot_png().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    // IHDR: width and height, big-endian, at bytes 16..24.
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 900));
    if let Some(path) = &path {
        std::fs::write(path, &png).expect("write the screenshot");
        eprintln!("wrote {}", path.display());
    }
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    drop(watch);
    browser.close().await;
    if let Ok(t) = Arc::try_unwrap(t) {
        t.shutdown().await;
    }
}
