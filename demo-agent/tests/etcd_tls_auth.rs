//! The agent on an etcd that requires TLS with client certificates and authentication
//! (certificates generated in the test with rcgen; etcdctl sets up the user and checks the
//! bytes from etcd's side).

mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::time::Duration;

use common::{bounded, header};
use demo_agent::KvCacheMode;
use etcd::EtcdCluster;
use reqwest::StatusCode;
use serde_json::Value;

const PASSWORD: &str = "pa55-w0rd/never-logged";

fn consul_index(response: &reqwest::Response) -> u64 {
    header(response, "x-consul-index")
        .parse()
        .expect("X-Consul-Index header")
}

#[tokio::test]
async fn etcd_tls_client_certs_and_auth() {
    if !etcd::available("etcd_tls_client_certs_and_auth")
        || !etcd::etcdctl_available("etcd_tls_client_certs_and_auth")
    {
        return;
    }
    bounded(async {
        let mut cluster = EtcdCluster::start_tls().await;
        cluster.enable_auth(PASSWORD);
        let tls = cluster.tls().expect("TLS material").clone();
        let password_file = tls.ca.with_file_name("password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
        let config = |password_file: &std::path::Path, client_cert: bool| {
            let mut config = etcd::etcd_config(cluster.endpoints(), KvCacheMode::Refresh);
            config.etcd_cacert = Some(tls.ca.clone());
            if client_cert {
                config.etcd_cert = Some(tls.client_cert.clone());
                config.etcd_key = Some(tls.client_key.clone());
            }
            config.etcd_user = Some("root".to_owned());
            config.etcd_password_file = Some(password_file.to_path_buf());
            config
        };
        let t = common::start(config(&password_file, true)).await;

        // Binary bytes written through the agent are the bytes etcd holds.
        let value: Vec<u8> = vec![0, 0x9f, 0x92, 0x96, 0xff, b'\n', b'x'];
        let response = t.put_body("/v1/kv/tls/bin", value.clone()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let got = cluster.etcdctl(&["get", "tls/bin", "--print-value-only"]);
        assert_eq!(got, [&value[..], b"\n"].concat());
        let response = t.get("/v1/kv/tls/bin?raw").await;
        assert_eq!(response.bytes().await.unwrap(), value);

        // A value written with etcdctl reads back through the cache as its bytes, flags 0,
        // and a later etcdctl write reaches a blocking cached read (a watch over TLS + auth).
        cluster.etcdctl(&["put", "tls/text", "from etcdctl"]);
        let response = t.get("/v1/kv/tls/text?cached").await;
        assert_eq!(response.status(), StatusCode::OK);
        let index = consul_index(&response);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body[0]["Flags"], 0);
        assert_eq!(body[0]["Value"], "ZnJvbSBldGNkY3Rs"); // base64("from etcdctl")
        let reader = {
            let url = t.url(&format!(
                "/v1/kv/tls/text?cached&raw&index={index}&wait=30s"
            ));
            tokio::spawn(async move { reqwest::get(url).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.etcdctl(&["put", "tls/text", "second"]);
        let response = reader.await.unwrap();
        assert!(consul_index(&response) > index);
        assert_eq!(response.bytes().await.unwrap(), "second".as_bytes());
        t.shutdown().await;

        // A wrong password and a missing client certificate are refused by etcd: the
        // agent answers an upstream error, never data.
        let wrong = tls.ca.with_file_name("wrong-password");
        std::fs::write(&wrong, "wrong\n").unwrap();
        for (what, config) in [
            ("a wrong password", config(&wrong, true)),
            ("no client certificate", config(&password_file, false)),
        ] {
            let t = common::start(config).await;
            let response = t.get("/v1/kv/tls/text").await;
            assert!(
                response.status().is_server_error(),
                "{what}: {}",
                response.status()
            );
            let body = response.text().await.unwrap();
            assert!(!body.contains(PASSWORD), "{what}: {body}");
            t.shutdown().await;
        }
    })
    .await;
}
