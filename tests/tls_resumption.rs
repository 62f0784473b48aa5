//! TLS session resumption on `ssl://` listeners: a wallet that reconnects
//! resumes its session instead of a full handshake, and still does after a
//! live reload (the ticket keys belong to the process, not to one
//! configuration).

mod support;

use rustls::HandshakeKind;
use serde_json::json;
use support::mock::Mock;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Connect with `connector` (which keeps the tickets it was given), ask
/// one thing so that the server's tickets are read, and tell how the
/// handshake went.
async fn handshake(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
) -> HandshakeKind {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let mut tls = BufReader::new(tls);
    tls.get_mut()
        .write_all(b"{\"id\":1,\"method\":\"server.ping\",\"params\":[]}\n")
        .await
        .unwrap();
    let mut line = String::new();
    tls.read_line(&mut line).await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&line).unwrap()["id"],
        json!(1)
    );
    kind
}

#[tokio::test]
async fn a_reconnecting_wallet_resumes_across_a_live_reload() {
    let mock = Mock::start().await;
    let text = config_text(&[mock.url()], "");
    let server = start_proxy(&text).await;
    wait_ready(&server, "test").await;
    let addr = ssl_addr(&server, "test");
    let wallet = tls_connector();

    assert_eq!(handshake(&wallet, addr).await, HandshakeKind::Full);
    assert_eq!(handshake(&wallet, addr).await, HandshakeKind::Resumed);

    // The same file read again: a new TLS configuration is built.
    let restart = server
        .reload(electrum_lb::Config::parse(&text, "reload.toml").unwrap())
        .unwrap();
    assert!(restart.is_empty(), "{restart:?}");
    assert_eq!(
        handshake(&wallet, addr).await,
        HandshakeKind::Resumed,
        "a ticket issued before the reload opens after it"
    );

    // Another wallet, without a ticket, makes a full handshake.
    assert_eq!(handshake(&tls_connector(), addr).await, HandshakeKind::Full);
    server.shutdown().await;
}
