//! Protocol 1.4, 1.6 and 1.7 wallets through the proxy, against a
//! protocol-1.4 upstream (the mock as an older ElectrumX) and a 1.7 one
//! (the mock as ElectrumX 2.0): what each level negotiates, what each
//! level is answered and refused, the 1.6 shapes, the scriptpubkey
//! methods, and the methods only an upstream of a given level can answer.

mod support;

use electrum_lb::protocol::V1_7;
use electrum_lb::upstream::{Capability, Need};
use electrum_lb::Server;
use serde_json::{json, Value};
use support::mock::{status_of, Mock, MockOptions};
use support::*;

/// The mock as a protocol-1.4 upstream or as ElectrumX 2.0 (up to 1.7).
async fn upstream(v17: bool) -> Mock {
    Mock::start_with(MockOptions {
        strict: true,
        protocol_max: v17.then(|| "1.7.0".to_string()),
        ..Default::default()
    })
    .await
}

/// The proxy in front of `mock`; with a 1.7 mock, once its 1.7
/// connection (the upstream's protocol slot) is up too.
async fn proxy(mock: &Mock, v17: bool) -> Server {
    let server = proxy_for(&[mock.url()]).await;
    if v17 {
        let pool = server.coins["test"].router.pool.clone();
        wait_until(|| pool.capability(Need::at_least(V1_7)) == Capability::Now).await;
    }
    server
}

/// A client that negotiated `version` (a string or a range).
async fn client(server: &Server, version: Value) -> Client {
    let mut c = Client::connect(tcp_addr(server, "test")).await;
    c.call("server.version", json!(["t", version])).await;
    c
}

fn error_code(reply: &Value) -> i64 {
    reply["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
}

#[tokio::test]
async fn each_level_negotiates_and_gets_its_local_answers() {
    let mock = upstream(false).await;
    let server = proxy(&mock, false).await;
    let addr = tcp_addr(&server, "test");
    let name = server.coins["test"].router.info.server_name.clone();

    for (asked, got) in [
        (json!("1.4"), "1.4"),
        (json!(["1.4", "1.6"]), "1.6"),
        (json!(["1.4", "1.7"]), "1.7"),
        (json!(["1.4", "1.9"]), "1.7"),
    ] {
        let mut c = Client::connect(addr).await;
        let v = c.call("server.version", json!(["t", asked])).await;
        assert_eq!(v, json!([name, got]), "{asked}");
        let f = c.call("server.features", json!([])).await;
        assert_eq!(f["protocol_max"], "1.7");
        // 1.7 dropped hash_function, as ElectrumX 2.0 does.
        assert_eq!(f.get("hash_function").is_some(), got != "1.7", "{f}");
    }

    // 1.7's ping: pong_len zeros back; before 1.7, null.
    let mut c14 = client(&server, json!("1.4")).await;
    assert_eq!(c14.call("server.ping", json!([])).await, Value::Null);
    let mut c17 = client(&server, json!(["1.4", "1.7"])).await;
    assert_eq!(
        c17.call("server.ping", json!([3, "ab"])).await,
        json!({"data": "000"})
    );
    assert_eq!(
        error_code(&c17.request("server.ping", json!([0, "xyz"])).await),
        1
    );
    // A ping notification gets nothing: the next line is the banner's.
    c17.send(&json!({"jsonrpc":"2.0","method":"server.ping","params":["00"]}))
        .await;
    c17.send(&json!({"jsonrpc":"2.0","id":"b","method":"server.banner","params":[]}))
        .await;
    assert_eq!(c17.recv().await["id"], "b");

    // Above 1.7 is refused (and the session closed).
    let mut hi = Client::connect(addr).await;
    let r = hi.request("server.version", json!(["t", "1.8"])).await;
    assert_eq!(error_code(&r), 1);
    assert!(hi.closed().await);
    for m in ["server.ping", "server.features", "server.banner"] {
        assert_eq!(
            mock.count(m) - u64::from(m == "server.features"),
            0,
            "{m} went upstream"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn removed_and_reshaped_methods_per_level_over_both_upstreams() {
    for v17 in [false, true] {
        let mock = upstream(v17).await;
        let server = proxy(&mock, v17).await;
        let sh = scripthash(1);
        mock.set_history(&sh, vec![(txid(1), 5)]);
        let three: Vec<String> = (2..5).map(|h| mock.header_hex(h)).collect();
        for (level, version) in [
            ("1.4", json!("1.4")),
            ("1.6", json!(["1.4", "1.6"])),
            ("1.7", json!(["1.4", "1.7"])),
        ] {
            let at = |v: &str| level >= v;
            let mut c = client(&server, version).await;
            let what = format!("{level} client, 1.7 upstream: {v17}");

            // relayfee: bridged up to 1.4, unknown from 1.6.
            let r = c.request("blockchain.relayfee", json!([])).await;
            if at("1.6") {
                assert_eq!(error_code(&r), -32601, "{what}");
                assert!(r["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("blockchain.relayfee"));
            } else {
                assert_eq!(r["result"], json!(0.00001), "{what}");
            }

            // scripthash methods: gone at 1.7.
            let r = c
                .request("blockchain.scripthash.get_history", json!([sh]))
                .await;
            if at("1.7") {
                assert_eq!(error_code(&r), -32601, "{what}");
            } else {
                assert_eq!(
                    r["result"],
                    json!([{"tx_hash": txid(1), "height": 5}]),
                    "{what}"
                );
            }

            // block.headers: hex up to 1.4, a list from 1.6.
            let h = c.call("blockchain.block.headers", json!([2, 3])).await;
            if at("1.6") {
                assert_eq!(
                    h,
                    json!({"count": 3, "max": 2016, "headers": three}),
                    "{what}"
                );
            } else {
                assert_eq!(
                    h,
                    json!({"hex": three.concat(), "count": 3, "max": 2016}),
                    "{what}"
                );
            }
        }
        server.shutdown().await;
    }
}

#[tokio::test]
async fn sessions_from_1_6_get_the_canonical_mempool_order() {
    let mock = upstream(false).await;
    let server = proxy(&mock, false).await;
    let sh = scripthash(2);
    let (a, b, c) = ("aa".repeat(32), "bb".repeat(32), "cc".repeat(32));
    // As an older ElectrumX may list them: mempool in no particular order.
    let history = vec![
        (txid(9), 7),
        (c.clone(), 0),
        (b.clone(), -1),
        (a.clone(), 0),
    ];
    mock.set_history(&sh, history.clone());
    let item = |t: &str, h: i64| json!({"tx_hash": t, "height": h});
    let fee = |t: &str, h: i64| json!({"tx_hash": t, "height": h, "fee": 100});

    let mut old = client(&server, json!("1.4")).await;
    let got = old
        .call("blockchain.scripthash.get_history", json!([sh]))
        .await;
    let as_is: Vec<Value> = history.iter().map(|(t, h)| item(t, *h)).collect();
    assert_eq!(got, json!(as_is));

    let mut new = client(&server, json!(["1.4", "1.6"])).await;
    let got = new
        .call("blockchain.scripthash.get_history", json!([sh]))
        .await;
    assert_eq!(
        got,
        json!([item(&txid(9), 7), item(&a, 0), item(&c, 0), item(&b, -1)])
    );
    let got = new
        .call("blockchain.scripthash.get_mempool", json!([sh]))
        .await;
    assert_eq!(got, json!([fee(&a, 0), fee(&c, 0), fee(&b, -1)]));
    server.shutdown().await;
}

#[tokio::test]
async fn estimatefee_mode_goes_only_to_upstreams_that_take_it() {
    for (v17, want) in [(false, 0.0001), (true, 0.0002)] {
        let mock = upstream(v17).await;
        let server = proxy(&mock, v17).await;
        let mut c = client(&server, json!(["1.4", "1.7"])).await;
        // The 1.4 mock refuses a second argument, as ElectrumX 1.x does:
        // the proxy drops the mode toward it.
        let fee = c
            .call("blockchain.estimatefee", json!([2, "economical"]))
            .await;
        assert_eq!(fee, json!(want), "1.7 upstream: {v17}");
        assert_eq!(
            c.call("blockchain.estimatefee", json!([2])).await,
            json!(0.0001)
        );
        let r = c
            .request("blockchain.estimatefee", json!([2, "fast"]))
            .await;
        assert_eq!(error_code(&r), 1);
        assert!(r["error"]["message"].as_str().unwrap().contains("FAST"));
        server.shutdown().await;
    }
}

#[tokio::test]
async fn level_methods_are_refused_clearly_where_no_upstream_speaks_the_level() {
    let mock = upstream(false).await;
    let server = proxy(&mock, false).await;
    let mut c = client(&server, json!(["1.4", "1.7"])).await;
    let raw = "0100".to_string();
    for (method, params, level) in [
        ("mempool.get_info", json!([]), "1.6"),
        (
            "blockchain.transaction.broadcast_package",
            json!([[raw, raw]]),
            "1.6",
        ),
        (
            "blockchain.transaction.testmempoolaccept",
            json!([[raw]]),
            "1.7",
        ),
        ("mempool.recent", json!([]), "1.7"),
    ] {
        let r = c.request(method, params).await;
        assert_eq!(error_code(&r), -32601, "{method}: {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(method) && msg.contains(level), "{msg}");
        assert!(
            msg.contains("1.4.2"),
            "says what the upstreams speak: {msg}"
        );
        if method.ends_with("broadcast_package") {
            assert!(msg.contains("not broadcast"), "{msg}");
        }
        assert_eq!(mock.count(method), 0, "{method} reached the upstream");
    }
    // A package is never split into single broadcasts.
    assert_eq!(mock.count("blockchain.transaction.broadcast"), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn level_methods_reach_an_upstream_that_speaks_the_level() {
    let mock = upstream(true).await;
    let server = proxy(&mock, true).await;
    // One ordinary connection at 1.4.2 (asked 1.4 to 1.4.2), the protocol
    // connection at 1.7.
    assert_eq!(mock.levels(), ["1.4.2", "1.7"]);
    let mut c = client(&server, json!(["1.4", "1.7"])).await;
    let info = c.call("mempool.get_info", json!([])).await;
    assert_eq!(info["minrelaytxfee"], json!(0.00001));
    let raw = "01000000000000000000".to_string();
    let package = c
        .call("blockchain.transaction.broadcast_package", json!([[raw]]))
        .await;
    assert_eq!(package, json!({"success": true}));
    assert_eq!(mock.count("blockchain.transaction.broadcast_package"), 1);
    let tested = c
        .call("blockchain.transaction.testmempoolaccept", json!([[raw]]))
        .await;
    assert_eq!(tested[0]["allowed"], json!(true));

    // mempool.recent is the same for everyone: one shared answer.
    let recent = c.call("mempool.recent", json!([])).await;
    assert_eq!(recent[0]["fee"], json!(100));
    let mut other = client(&server, json!(["1.4", "1.7"])).await;
    assert_eq!(other.call("mempool.recent", json!([])).await, recent);
    assert_eq!(mock.count("mempool.recent"), 1);

    // The level methods went to the 1.7 connection, the others stay on
    // the 1.4 one: the scripthash methods are gone at 1.7 upstream.
    let mut old = client(&server, json!("1.4")).await;
    old.call("blockchain.scripthash.get_history", json!([scripthash(3)]))
        .await;
    server.shutdown().await;
}

#[tokio::test]
async fn scriptpubkey_methods_share_the_scripthash_subscription() {
    for v17 in [false, true] {
        let mock = upstream(v17).await;
        let server = proxy(&mock, v17).await;
        let spk = format!("76a914{}88ac", "11".repeat(20));
        let sh = {
            use sha2::Digest;
            let mut h = sha2::Sha256::digest(hex::decode(&spk).unwrap()).to_vec();
            h.reverse();
            hex::encode(h)
        };
        let history = vec![(txid(1), 5), (txid(2), 0)];
        mock.set_history(&sh, history.clone());

        let mut c17 = client(&server, json!(["1.4", "1.7"])).await;
        let h = c17
            .call("blockchain.scriptpubkey.get_history", json!([spk]))
            .await;
        assert_eq!(
            h,
            json!({"history": [{"tx_hash": txid(1), "height": 5}, {"tx_hash": txid(2), "height": 0}]})
        );
        let m = c17
            .call("blockchain.scriptpubkey.get_mempool", json!([spk]))
            .await;
        assert_eq!(
            m,
            json!({"history": [{"tx_hash": txid(2), "height": 0, "fee": 100}]})
        );
        let u = c17
            .call("blockchain.scriptpubkey.listunspent", json!([spk]))
            .await;
        assert_eq!(u["utxos"].as_array().unwrap().len(), 2);
        let b = c17
            .call("blockchain.scriptpubkey.get_balance", json!([spk]))
            .await;
        assert_eq!(b, json!({"confirmed": 1000, "unconfirmed": 1000}));
        assert_eq!(
            error_code(
                &c17.request("blockchain.scriptpubkey.get_history", json!(["xyz"]))
                    .await
            ),
            1
        );

        // A 1.4 wallet on the scripthash, a 1.7 wallet on the script: one
        // upstream subscription, each notified in its own form.
        let status = json!(status_of(&history));
        let mut c14 = client(&server, json!("1.4")).await;
        assert_eq!(
            c14.call("blockchain.scripthash.subscribe", json!([sh]))
                .await,
            status
        );
        assert_eq!(
            c17.call("blockchain.scriptpubkey.subscribe", json!([spk]))
                .await,
            status
        );
        assert_eq!(mock.subscriptions(), 1);
        assert_eq!(mock.count("blockchain.scripthash.subscribe"), 1);

        let moved = vec![(txid(1), 5), (txid(2), 6)];
        mock.set_history(&sh, moved.clone());
        let new = json!([sh, status_of(&moved)]);
        assert_eq!(
            c14.notification("blockchain.scripthash.subscribe").await,
            new
        );
        assert_eq!(
            c17.notification("blockchain.scriptpubkey.subscribe").await,
            new
        );

        assert_eq!(
            c17.call("blockchain.scriptpubkey.unsubscribe", json!([spk]))
                .await,
            json!(true)
        );
        assert_eq!(
            c17.call("blockchain.scriptpubkey.unsubscribe", json!([spk]))
                .await,
            json!(false)
        );
        // The 1.4 wallet still holds it upstream.
        assert_eq!(mock.subscriptions(), 1);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn sessions_and_connections_are_counted_by_level() {
    let mock = upstream(true).await;
    let server = proxy(&mock, true).await;
    let _a = client(&server, json!("1.4")).await;
    let _b = client(&server, json!(["1.4", "1.6"])).await;
    let mut c = client(&server, json!(["1.4", "1.7"])).await;
    c.call("blockchain.scriptpubkey.subscribe", json!(["51"]))
        .await;
    let _none = Client::connect(tcp_addr(&server, "test")).await;
    let (_, text) = http_get(server.metrics_addr, "/metrics").await;
    for (series, want) in [
        (
            "electrum_lb_sessions_by_protocol{coin=\"test\",level=\"1.4\"}",
            1.0,
        ),
        (
            "electrum_lb_sessions_by_protocol{coin=\"test\",level=\"1.6\"}",
            1.0,
        ),
        (
            "electrum_lb_sessions_by_protocol{coin=\"test\",level=\"1.7\"}",
            1.0,
        ),
        (
            "electrum_lb_session_subscriptions{coin=\"test\",form=\"scriptpubkey\"}",
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series}");
    }
    let url = mock.url();
    for level in ["1.4.2", "1.7"] {
        let series = format!(
            "electrum_lb_upstream_protocol_connections{{coin=\"test\",level=\"{level}\",upstream=\"{url}\"}}"
        );
        assert_eq!(sample(&text, &series), Some(1.0), "{series}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscribe_and_unsubscribe_pipelined_are_answered_in_order() {
    // As ElectrumX answers them: the subscribe gets the status even though
    // the unsubscribe arrived before the upstream answered.
    let mock = upstream(false).await;
    let server = proxy(&mock, false).await;
    mock.set_delay(std::time::Duration::from_millis(200));
    let mut c = client(&server, json!(["1.4", "1.7"])).await;
    let spk = "51";
    let sh51 = {
        use sha2::Digest;
        let mut h = sha2::Sha256::digest([0x51u8]).to_vec();
        h.reverse();
        hex::encode(h)
    };
    mock.set_history(&sh51, vec![(txid(6), 9)]);
    c.send_raw(
        format!(
            "{}\n{}\n",
            json!({"jsonrpc":"2.0","id":1,"method":"blockchain.scriptpubkey.subscribe","params":[spk]}),
            json!({"jsonrpc":"2.0","id":2,"method":"blockchain.scriptpubkey.unsubscribe","params":[spk]})
        )
        .as_bytes(),
    )
    .await;
    let mut replies = [c.recv().await, c.recv().await];
    replies.sort_by_key(|r| r["id"].as_u64());
    assert_eq!(
        replies[0]["result"],
        json!(status_of(&[(txid(6), 9)])),
        "{}",
        replies[0]
    );
    assert_eq!(replies[1]["result"], json!(true), "{}", replies[1]);
    // Nobody holds it: the upstream subscription is released.
    wait_until(|| mock.subscriptions() == 0).await;
    server.shutdown().await;
}
