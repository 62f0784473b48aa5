//! The WebSocket side of the benchmark: idle browser sessions, and how
//! their memory compares with TCP sessions'.

use crate::idle::Held;
use crate::Path;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// `n` WebSocket sessions that sent `server.version` and
/// `blockchain.headers.subscribe` (as the TCP idle sessions do), each in
/// its own message, and got both answers; from spread addresses (`first`
/// on, see [`crate::spread::connect_from`]).
pub(crate) async fn open_idle_ws_sessions(
    addr: SocketAddr,
    n: usize,
    first: usize,
) -> Vec<WebSocketStream<TcpStream>> {
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("open");
            let tcp = crate::spread::connect_from(first + i, addr).await;
            // The client's buffers are this process's, not the proxy's:
            // kept small so that 10,000 of them fit easily.
            let config = WebSocketConfig::default().read_buffer_size(4096);
            let (mut ws, _) = tokio_tungstenite::client_async_with_config(
                format!("ws://{addr}/"),
                tcp,
                Some(config),
            )
            .await
            .expect("WebSocket upgrade");
            for request in [
                r#"{"jsonrpc":"2.0","id":1,"method":"server.version","params":["bench","1.4"]}"#,
                r#"{"jsonrpc":"2.0","id":2,"method":"blockchain.headers.subscribe","params":[]}"#,
            ] {
                ws.send(Message::text(request)).await.expect("send");
            }
            let mut answers = 0;
            while answers < 2 {
                match ws.next().await {
                    Some(Ok(Message::Text(_))) => answers += 1,
                    Some(Ok(_)) => {}
                    other => panic!("session closed before its answers: {other:?}"),
                }
            }
            ws
        });
    }
    let mut sessions = Vec::with_capacity(n);
    while let Some(s) = tasks.join_next().await {
        sessions.push(s.expect("session"));
    }
    sessions
}

/// One line: an idle WebSocket session's memory against a TCP session's,
/// both measured in this run.
pub(crate) fn print_idle_ratio(rows: &[Held]) {
    let per_session = |path: Path| {
        rows.iter()
            .find(|h| h.path == path)
            .map(Held::per_session_kib)
    };
    if let (Some(tcp), Some(ws)) = (per_session(Path::Lb), per_session(Path::LbWs)) {
        println!(
            "idle session memory, WebSocket / TCP: {:.1} KiB / {:.1} KiB = {:.2}x",
            ws,
            tcp,
            ws / tcp
        );
    }
}
