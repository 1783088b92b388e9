//! The probe endpoints Consul clients and tools call first, and the refusal of sessions.
//!
//! - `GET /v1/status/leader`: the address of the "leader" as a JSON string. The agent is its
//!   own one-member cluster: it answers its own listen address.
//! - `GET /v1/status/peers`: that address alone, as a JSON array.
//! - `GET /v1/agent/self`: a minimal, truthful subset of Consul's shape: `Config` (this
//!   agent's datacenter, node name, version, server = false) and `Member`, plus `DemoAgent`
//!   (the upstream in use).
//! - `/v1/session/*`: sessions (and so locks) are not implemented: a 400 saying so.
//! - `/v1/txn`: transactions are not implemented: a 400 saying so (a 404 would read as
//!   "nothing found" to clients that treat 404 so, and a transaction would seem done).

use axum::extract::State;
use axum::http::header::HOST;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::consul::DATACENTER;
use super::error::ApiError;
use super::response::JsonLine;
use super::state::AgentState;

/// The version this agent reports.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The node name this agent reports.
pub(crate) const NODE_NAME: &str = "demo-agent";

/// The address the client reached this agent at (its `Host` header); empty when it sent
/// none (Consul's "no leader" answer).
fn own_address(headers: &HeaderMap) -> String {
    headers
        .get(HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// `GET /v1/status/leader`.
pub(super) async fn leader(headers: HeaderMap) -> Response {
    JsonLine(own_address(&headers)).into_response()
}

/// `GET /v1/status/peers`.
pub(super) async fn peers(headers: HeaderMap) -> Response {
    let address = own_address(&headers);
    let peers: Vec<String> = (!address.is_empty())
        .then_some(address)
        .into_iter()
        .collect();
    JsonLine(peers).into_response()
}

/// `GET /v1/agent/self`.
pub(super) async fn agent_self(State(state): State<AgentState>, headers: HeaderMap) -> Response {
    let upstream = if state.etcd().is_some() {
        "etcd"
    } else {
        "embedded"
    };
    let address = own_address(&headers);
    let (host, port) = address
        .rsplit_once(':')
        .map_or((address.as_str(), ""), |(host, port)| (host, port));
    JsonLine(json!({
        "Config": {
            "Datacenter": DATACENTER,
            "NodeName": NODE_NAME,
            "Version": VERSION,
            "Server": false,
        },
        "Member": {
            "Name": NODE_NAME,
            "Addr": host,
            "Port": port.parse::<u16>().unwrap_or(0),
            "Status": 1,
        },
        "DemoAgent": {
            "Version": VERSION,
            "Upstream": upstream,
        },
    }))
    .into_response()
}

/// `/v1/session/*`: not implemented.
pub(super) async fn session(uri: Uri) -> ApiError {
    not_supported(
        &uri,
        "this agent implements no sessions (and so no locks, ?acquire or ?release)",
    )
}

/// `/v1/txn`: not implemented.
pub(super) async fn txn(uri: Uri) -> ApiError {
    not_supported(
        &uri,
        "this agent implements no transactions; write keys one by one (PUT /v1/kv/<key>, \
         with ?cas= for a compare-and-set)",
    )
}

/// A 400 naming the Consul endpoint the agent does not implement, and why.
fn not_supported(uri: &Uri, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!("{} is not supported: {why}", uri.path()),
    )
}
