//! Two endpoints on loopback with certificates from `kvmesh cert`: same CA talks, another CA or
//! no certificate is refused, and a reset stream surfaces as an error, never a hang.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvmesh_transport::endpoint::{respond, EndpointConfig};
use kvmesh_transport::{certs, MeshEndpoint, RequestHead, ResponseHead, TlsIdentity};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn identity(dir: &std::path::Path, name: &str) -> TlsIdentity {
    if !dir.join(certs::CA_CERT).exists() {
        certs::create_ca(dir, "test").unwrap();
    }
    certs::create_node(dir, dir, name).unwrap();
    let (ca, crt, key) = TlsIdentity::paths_in(dir, name);
    TlsIdentity::load(&ca, &crt, &key).unwrap()
}

fn endpoint(id: &TlsIdentity) -> Arc<MeshEndpoint> {
    endpoint_in(id, None)
}

fn endpoint_in(id: &TlsIdentity, cluster_id: Option<&str>) -> Arc<MeshEndpoint> {
    let cfg = EndpointConfig {
        cluster_id: cluster_id.map(str::to_owned),
        ..EndpointConfig::new("127.0.0.1:0".parse().unwrap())
    };
    let (ep, _inbox) = MeshEndpoint::bind(id, cfg, &CancellationToken::new(), &TaskTracker::new()).unwrap();
    ep
}

fn head() -> RequestHead {
    RequestHead {
        path: "/v1/chat/completions".into(),
        request_id: "r1".into(),
        origin: "a".into(),
        engine: "e".into(),
        stream: true,
        prompt: None,
        ..Default::default()
    }
}

fn echo_handler(ep: &MeshEndpoint) {
    ep.set_request_handler(Arc::new(|req| {
        Box::pin(async move {
            let h = ResponseHead {
                status: 200,
                content_type: "text/plain".into(),
                served_by: req.peer_name.unwrap_or_default(),
                retryable: false,
                retry_after_s: None,
            };
            let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from("echo:")), Ok(req.body)]);
            let _ = respond(req.respond, &h, body, Duration::from_secs(2)).await;
        })
    }));
}

async fn read_all(mut recv: quinn::RecvStream) -> Result<Vec<u8>, String> {
    recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn same_ca_round_trip_names_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let a = endpoint(&identity(dir.path(), "node-a"));
    let b = endpoint(&identity(dir.path(), "node-b"));
    echo_handler(&b);
    let (h, recv) = a.request(b.local_addr(), &head(), b"hello", Duration::from_secs(2)).await.unwrap();
    assert_eq!(h.status, 200);
    // B read A's name from A's client certificate.
    assert_eq!(h.served_by, "node-a");
    assert_eq!(read_all(recv).await.unwrap(), b"echo:hello");
    // The connection is pooled: a second request reuses it.
    let (_, recv) = a.request(b.local_addr(), &head(), b"again", Duration::from_secs(2)).await.unwrap();
    assert_eq!(read_all(recv).await.unwrap(), b"echo:again");
    assert_eq!(a.connected_peers(), vec![b.local_addr()]);
}

#[tokio::test]
async fn foreign_ca_is_refused_both_ways() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let member = endpoint(&identity(d1.path(), "member"));
    let stranger = endpoint(&identity(d2.path(), "stranger"));
    echo_handler(&member);
    echo_handler(&stranger);
    let err = stranger.request(member.local_addr(), &head(), b"x", Duration::from_secs(2)).await;
    assert!(err.is_err(), "a node of another CA must not get in");
    let err = member.request(stranger.local_addr(), &head(), b"x", Duration::from_secs(2)).await;
    assert!(err.is_err(), "a member must not talk to a server of another CA");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(member.stats.refused_connections.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

/// Two meshes under one CA (the same certificates) but different cluster ids cannot reach each
/// other: the ALPN each offers names its cluster.
#[tokio::test]
async fn another_cluster_under_the_same_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = endpoint_in(&identity(dir.path(), "node-a"), Some("prod"));
    let b = endpoint_in(&identity(dir.path(), "node-b"), Some("prod"));
    let c = endpoint_in(&identity(dir.path(), "node-c"), Some("staging"));
    echo_handler(&b);
    echo_handler(&c);
    let (h, _) = a.request(b.local_addr(), &head(), b"x", Duration::from_secs(2)).await.expect("same cluster");
    assert_eq!(h.status, 200);
    assert!(a.request(c.local_addr(), &head(), b"x", Duration::from_secs(2)).await.is_err(), "another cluster");
    assert!(c.request(b.local_addr(), &head(), b"x", Duration::from_secs(2)).await.is_err(), "either way");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let member = endpoint(&identity(dir.path(), "member"));
    echo_handler(&member);
    // A QUIC client that trusts the CA but presents no certificate.
    let ca = identity(dir.path(), "unused").ca;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![kvmesh_transport::ALPN.to_vec()];
    let client_cfg =
        quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()));
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_cfg);
    let outcome = async {
        let conn = client.connect(member.local_addr(), "member").unwrap().await.map_err(|e| e.to_string())?;
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        s.write_all(b"\0\0\0\x02{}").await.map_err(|e| e.to_string())?;
        s.finish().map_err(|e| e.to_string())?;
        r.read_to_end(1024).await.map_err(|e| e.to_string())
    };
    let res = tokio::time::timeout(Duration::from_secs(5), outcome).await.expect("refusal must not hang");
    assert!(res.is_err(), "got {res:?}");
}

#[tokio::test]
async fn reset_stream_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let a = endpoint(&identity(dir.path(), "a"));
    let b = endpoint(&identity(dir.path(), "b"));
    b.set_request_handler(Arc::new(|req| {
        Box::pin(async move {
            let mut send = req.respond;
            let h = kvmesh_transport::frame::encode_head(&ResponseHead {
                status: 200,
                content_type: "text/event-stream".into(),
                served_by: "b/e".into(),
                retryable: false,
                retry_after_s: None,
            })
            .unwrap();
            send.write_all(&h).await.unwrap();
            send.write_all(b"data: partial").await.unwrap();
            // Let the head arrive first, so the reset hits the body.
            tokio::time::sleep(Duration::from_millis(200)).await;
            send.reset(7u32.into()).unwrap();
        })
    }));
    let (_, recv) = a.request(b.local_addr(), &head(), b"", Duration::from_secs(2)).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), read_all(recv)).await.expect("no hang");
    assert!(r.is_err(), "a reset must not read as a clean end: {r:?}");
}

#[test]
fn cert_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    certs::create_ca(dir.path(), "t").unwrap();
    assert!(certs::create_ca(dir.path(), "t").is_err(), "never overwrite a CA");
    assert!(certs::create_node(dir.path(), dir.path(), "bad name!").is_err());
}

/// One peer cannot hold more than 1,024 request streams open on a node: the next one waits for
/// a free slot instead of costing the node another buffer.
#[tokio::test]
async fn a_peer_cannot_open_unbounded_streams() {
    let dir = tempfile::tempdir().unwrap();
    let a = endpoint(&identity(dir.path(), "node-a"));
    let b = endpoint(&identity(dir.path(), "node-b"));
    echo_handler(&b);
    let conn = a.connection(b.local_addr()).await.unwrap();
    let mut held = Vec::new();
    for i in 0..1024 {
        let (mut send, recv) = tokio::time::timeout(Duration::from_secs(2), conn.open_bi())
            .await
            .unwrap_or_else(|_| panic!("stream {i} opens"))
            .unwrap();
        // A stream counts once the peer has seen it.
        send.write_all(b"x").await.unwrap();
        held.push((send, recv));
    }
    let next = tokio::time::timeout(Duration::from_millis(300), conn.open_bi()).await;
    assert!(next.is_err(), "the 1,025th stream must wait for a slot");
}
