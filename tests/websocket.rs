//! WebSocket sessions (issue 17), end to end: what the TCP tests show,
//! through `ws://` and `wss://` listeners, with tokio-tungstenite's client.
//! Framing follows ElectrumX and Fulcrum: one JSON-RPC message (a request,
//! or a whole batch) per WebSocket message, answers and notifications one
//! per text message, no newline needed.
mod support;

use electrum_lb::config::Scheme;
use electrum_lb::Server;
use futures_util::SinkExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::mock::{status_from_history, status_of, Mock, MockOptions};
use support::ws::{line_client, next_json, next_message, open, ws_url, wss_url, Raw};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// One coin `test` in front of `upstreams` with TCP, WS and WSS listeners;
/// `server_extra` goes into `[server]` (see `config_multi`).
fn config(upstreams: &[String], server_extra: &str) -> String {
    let ups: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    config_multi(server_extra, &[("test", ups, "")]).replace(
        "listen = [\"tcp://127.0.0.1:0\", \"ssl://127.0.0.1:0\"]",
        "listen = [\"tcp://127.0.0.1:0\", \"ws://127.0.0.1:0\", \"wss://127.0.0.1:0\"]",
    )
}

async fn proxy(upstreams: &[String], server_extra: &str) -> Server {
    let server = start_proxy(&config(upstreams, server_extra)).await;
    wait_until(|| {
        server
            .upstreams()
            .values()
            .all(|ups| ups.iter().all(|u| u.ready_connections > 0))
    })
    .await;
    server
}

/// The `ws://` and `wss://` URLs of coin `test`.
fn urls(server: &Server) -> [String; 2] {
    [
        ws_url(server.addr("test", Scheme::Ws).unwrap()),
        wss_url(server.addr("test", Scheme::Wss).unwrap()),
    ]
}

async fn raw(url: &str) -> Raw {
    open(url, &[]).await.expect("WebSocket upgrade")
}

fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error, got {v}"))
}

#[tokio::test]
async fn versions_and_session_methods_over_ws_and_wss() {
    let mock = Mock::start().await;
    let server = proxy(&[mock.url()], "").await;
    for url in urls(&server) {
        let (mut c, _) = line_client(&url).await;
        let v = c.call("server.version", json!(["web wallet", "1.4"])).await;
        assert_eq!(v[1], "1.4", "{url}: {v}");
        assert!(v[0].as_str().unwrap().starts_with("electrum-lb"), "{v}");
        // Asked again (a keep-alive), answered again.
        let v = c
            .call("server.version", json!(["web wallet", ["1.4", "1.6"]]))
            .await;
        assert!(v[1].is_string(), "{v}");
        assert_eq!(c.call("server.ping", json!([])).await, Value::Null);
        let features = c.call("server.features", json!([])).await;
        let ports = &features["hosts"]["localhost"];
        assert_eq!(
            ports["ws_port"],
            json!(server.addr("test", Scheme::Ws).unwrap().port()),
            "{features}"
        );
        assert_eq!(
            ports["wss_port"],
            json!(server.addr("test", Scheme::Wss).unwrap().port()),
            "{features}"
        );
        assert!(ports["tcp_port"].is_u64(), "{features}");
        // Forwarded to the upstream and back.
        let h = c.call("blockchain.block.header", json!([3])).await;
        assert_eq!(h, mock.header_hex(3));
        let tip = c.call("blockchain.headers.subscribe", json!([])).await;
        assert_eq!(tip["height"], 99);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn messages_map_to_requests_one_to_one() {
    let mock = Mock::start().await;
    let server = proxy(&[mock.url()], "").await;
    for url in urls(&server) {
        let mut ws = raw(&url).await;
        // A text message without a newline.
        ws.send(Message::text(r#"{"id":1,"method":"server.ping"}"#))
            .await
            .unwrap();
        assert_eq!(
            next_json(&mut ws).await,
            json!({"jsonrpc":"2.0","result":null,"id":1})
        );
        // With a trailing newline, and pretty-printed over several lines.
        ws.send(Message::text("{\"id\":2,\"method\":\"server.ping\"}\n"))
            .await
            .unwrap();
        assert_eq!(next_json(&mut ws).await["id"], 2);
        let pretty = serde_json::to_string_pretty(
            &json!({"jsonrpc":"2.0","id":3,"method":"blockchain.block.header","params":[2]}),
        )
        .unwrap();
        assert!(pretty.contains('\n'));
        ws.send(Message::text(pretty)).await.unwrap();
        let v = next_json(&mut ws).await;
        assert_eq!(v["result"], json!(mock.header_hex(2)), "{v}");
        // A binary message is read the same way; the answer is text.
        ws.send(Message::binary(
            br#"{"id":4,"method":"server.ping"}"#.to_vec(),
        ))
        .await
        .unwrap();
        assert_eq!(next_json(&mut ws).await["id"], 4);
        // An empty message is skipped, as an empty line is.
        ws.send(Message::text("")).await.unwrap();
        ws.send(Message::text(r#"{"id":5,"method":"server.ping"}"#))
            .await
            .unwrap();
        assert_eq!(next_json(&mut ws).await["id"], 5);
        // Invalid JSON: a parse error, and the session goes on.
        ws.send(Message::text("{\"id\":6,")).await.unwrap();
        let v = next_json(&mut ws).await;
        assert_eq!(error_code(&v), -32700, "{v}");
        assert_eq!(v["id"], Value::Null);
        // Two requests in one message are not two messages: one parse
        // error (as ElectrumX and Fulcrum answer it).
        ws.send(Message::text(
            "{\"id\":7,\"method\":\"server.ping\"}{\"id\":8,\"method\":\"server.ping\"}",
        ))
        .await
        .unwrap();
        assert_eq!(error_code(&next_json(&mut ws).await), -32700);
        ws.send(Message::text(r#"{"id":9,"method":"server.ping"}"#))
            .await
            .unwrap();
        assert_eq!(next_json(&mut ws).await["id"], 9);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_batch_is_one_message_each_way() {
    let mock = Mock::start().await;
    let server = proxy(&[mock.url()], "").await;
    for url in urls(&server) {
        let mut ws = raw(&url).await;
        mock.set_delay(Duration::from_millis(100));
        let batch = json!([
            {"jsonrpc":"2.0","id":1,"method":"server.ping","params":[]},
            {"jsonrpc":"2.0","id":"b","method":"blockchain.block.header","params":[3]},
            {"jsonrpc":"2.0","method":"blockchain.block.header","params":[4]},
            {"id":8,"method":"blockchain.estimatefee","params":[2]},
            {"id":9,"method":"no.such.method","params":[]}
        ]);
        ws.send(Message::text(batch.to_string())).await.unwrap();
        let v = next_json(&mut ws).await;
        let ids: Vec<Value> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].clone())
            .collect();
        assert_eq!(ids, vec![json!(1), json!("b"), json!(8), json!(9)], "{v}");
        assert_eq!(v[1]["result"], json!(mock.header_hex(3)));
        assert_eq!(v[2]["result"], json!(0.0001));
        assert_eq!(error_code(&v[3]), -32601);
        mock.set_delay(Duration::ZERO);
        // A batch of one is still an array.
        ws.send(Message::text(r#"[{"id":5,"method":"server.ping"}]"#))
            .await
            .unwrap();
        assert_eq!(
            next_json(&mut ws).await,
            json!([{"jsonrpc":"2.0","result":null,"id":5}])
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_fan_out_to_tcp_and_websocket_sessions_alike() {
    let mock = Mock::start().await;
    let h0 = vec![(txid(1), 50)];
    mock.set_history_silently(&scripthash(1), h0.clone());
    let server = proxy(&[mock.url()], "").await;
    let [ws, wss] = urls(&server);
    let (tcp_client, status) = subscribed_wallet(tcp_addr(&server, "test"), &scripthash(1)).await;
    assert_eq!(status, json!(status_of(&h0)));
    let mut clients = vec![tcp_client];
    for url in [&ws, &wss, &ws] {
        let (mut c, _) = line_client(url).await;
        c.call("server.version", json!(["web", "1.4"])).await;
        let status = c
            .call("blockchain.scripthash.subscribe", json!([scripthash(1)]))
            .await;
        assert_eq!(status, json!(status_of(&h0)));
        clients.push(c);
    }
    for c in clients.iter_mut() {
        let tip = c.call("blockchain.headers.subscribe", json!([])).await;
        assert_eq!(tip["height"], 99);
    }
    // Four sessions, one upstream subscription.
    assert_eq!(mock.subscriptions(), 1);

    let h1 = vec![(txid(1), 50), (txid(2), 0)];
    mock.set_history(&scripthash(1), h1.clone());
    for c in clients.iter_mut() {
        let params = c.notification("blockchain.scripthash.subscribe").await;
        assert_eq!(params, json!([scripthash(1), status_of(&h1)]));
    }
    mock.mine(1);
    for c in clients.iter_mut() {
        let params = c.notification("blockchain.headers.subscribe").await;
        assert_eq!(params[0]["height"], 100);
        assert_eq!(params[0]["hex"], json!(mock.tip().1));
    }
    // Exactly once each.
    for c in clients.iter_mut() {
        assert_eq!(fence(c).await, Vec::<Value>::new());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscriptions_survive_a_failover() {
    let a = Mock::start().await;
    let b = Mock::start().await;
    let h0 = vec![(txid(1), 50)];
    for m in [&a, &b] {
        m.set_history_silently(&scripthash(1), h0.clone());
    }
    let server = proxy(&[a.url(), b.url()], "").await;
    let mut clients = Vec::new();
    for url in urls(&server) {
        let (mut c, _) = line_client(&url).await;
        let status = c
            .call("blockchain.scripthash.subscribe", json!([scripthash(1)]))
            .await;
        assert_eq!(status, json!(status_of(&h0)));
        c.call("blockchain.headers.subscribe", json!([])).await;
        clients.push(c);
    }
    let (dead, survivor) = if a.subscriptions() > 0 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(dead.subscriptions(), 1);

    // The holder dies; meanwhile the status changes on the survivor.
    dead.stop();
    let h1 = vec![(txid(1), 50), (txid(2), 0)];
    survivor.set_history(&scripthash(1), h1.clone());
    for c in clients.iter_mut() {
        let params = c.notification("blockchain.scripthash.subscribe").await;
        assert_eq!(params, json!([scripthash(1), status_of(&h1)]));
    }
    wait_until(|| survivor.subscriptions() == 1).await;
    survivor.mine(1);
    for c in clients.iter_mut() {
        let params = c.notification("blockchain.headers.subscribe").await;
        assert_eq!(params[0]["height"], 100);
        assert_eq!(fence(c).await, Vec::<Value>::new());
        let h = c
            .call("blockchain.scripthash.get_history", json!([scripthash(1)]))
            .await;
        assert_eq!(status_from_history(&h), status_of(&h1));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn large_answers_arrive_whole_in_one_message() {
    let mock = Mock::start_with(MockOptions {
        blocks: Some(2100),
        ..Default::default()
    })
    .await;
    let server = proxy(
        &[mock.url()],
        "upstream_stall_secs = 30\nrequest_timeout_secs = 30",
    )
    .await;
    let mut tcp = Client::connect(tcp_addr(&server, "test")).await;
    let want = tcp.call("blockchain.block.headers", json!([0, 2016])).await;
    // About 320 KB: sent in fragments, read as one message.
    assert!(want["hex"].as_str().unwrap().len() > 300_000);
    for url in urls(&server) {
        let mut ws = raw(&url).await;
        ws.send(Message::text(
            r#"{"id":1,"method":"blockchain.block.headers","params":[0,2016]}"#,
        ))
        .await
        .unwrap();
        let v = next_json(&mut ws).await;
        assert_eq!(v["result"], want, "{url}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn sessions_are_counted_by_transport() {
    let mock = Mock::start().await;
    let server = proxy(&[mock.url()], "").await;
    let [ws, wss] = urls(&server);
    let (mut a, _) = line_client(&ws).await;
    let (mut b, _) = line_client(&wss).await;
    let (mut c, _) = line_client(&wss).await;
    for x in [&mut a, &mut b, &mut c] {
        x.call("server.ping", json!([])).await;
    }
    let text = server.metrics.render();
    let open = |t: &str| {
        sample(
            &text,
            &format!("electrum_lb_sessions_open{{coin=\"test\",transport=\"{t}\"}}"),
        )
    };
    assert_eq!(open("ws"), Some(1.0), "{text}");
    assert_eq!(open("wss"), Some(2.0), "{text}");
    drop(a);
    wait_until(|| {
        sample(
            &server.metrics.render(),
            "electrum_lb_sessions_open{coin=\"test\",transport=\"ws\"}",
        ) == Some(0.0)
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_websocket_client_that_stops_reading_is_disconnected() {
    let mock = Mock::start_with(MockOptions {
        blocks: Some(2100),
        ..Default::default()
    })
    .await;
    let server = proxy(
        &[mock.url()],
        "session_queue = 8\nidle_timeout_secs = 2\nupstream_stall_secs = 30\nrequest_timeout_secs = 30",
    )
    .await;
    let addr = server.addr("test", Scheme::Ws).unwrap();
    // About 20 MB of answers asked for, none read, over a small receive
    // buffer: as the TCP test of the same name.
    const REQUESTS: usize = 64;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        ws_url(addr),
    )
    .unwrap();
    let mut slow = support::ws::open_on(tcp, request).await.unwrap();
    slow.send(Message::text(r#"{"id":"p","method":"server.ping"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut slow).await["id"], "p");
    assert_eq!(server.session_count(), 1);
    for i in 0..REQUESTS {
        slow.send(Message::text(
            json!({"id":i,"method":"blockchain.block.headers","params":[0, 2016]}).to_string(),
        ))
        .await
        .unwrap();
    }
    let t = Instant::now();
    wait_until(|| server.session_count() == 0).await;
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "disconnected after {:?}, idle timeout is 2 s",
        t.elapsed()
    );
    // What it reads now is what had been written before it was cut off.
    let mut answers = 0;
    while let Some(m) = next_message(&mut slow).await {
        if matches!(m, Message::Text(_)) {
            answers += 1;
        }
    }
    assert!(answers < REQUESTS, "all {answers} answers were buffered");
    // Other sessions are served as before.
    let (mut other, _) = line_client(&ws_url(addr)).await;
    assert_eq!(
        other.call("blockchain.block.header", json!([1])).await,
        mock.header_hex(1)
    );
    server.shutdown().await;
}
