//! The `demo-agent` binary: parses flags, starts the agent, prints `listening on ADDR` and a
//! quick start on stdout (logs go to stderr), and shuts down cleanly on Ctrl-C or SIGTERM.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use demo_agent::{Agent, Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    init_logs(config.log_format);

    let quiet = config.quiet;
    let agent = match Agent::start(config).await {
        Ok(agent) => agent,
        Err(error) => {
            eprintln!("demo-agent: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {}", agent.addr());
    if !quiet {
        println!("{}", quick_start(&agent.url()));
    }

    let handle = agent.shutdown_handle();
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        tracing::info!(signal, "shutting down");
        handle.shutdown();
    });
    match agent.wait().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo-agent: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr at `RUST_LOG`'s level (default `info`): text lines, coloured only when
/// stderr is a terminal, or one JSON object per line.
fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM and names it.
async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

fn quick_start(url: &str) -> String {
    format!(
        "\
quick start (Ctrl-C stops the agent):
  curl -s -X PUT --data 'hello' {url}/v1/kv/greeting
  curl -si '{url}/v1/kv/greeting?cached'          # X-Cache: MISS, then HIT
  curl -si '{url}/v1/kv/greeting?cached&index=2&wait=30s'   # blocks until the next write
  curl -sN '{url}/v1/watch?key=greeting&prefix=app/'   # server-sent events
  curl -s  '{url}/v1/agent/ready'                 # 503 while the upstream is unreachable
  curl -s  '{url}/v1/agent/metrics'"
    )
}
