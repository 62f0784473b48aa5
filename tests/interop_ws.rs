//! WebSocket interop (issue 17): one wallet session, run over `ws://`
//! directly against ElectrumX 2.0's own WebSocket service, and through
//! electrum-lb's `ws://` and `wss://` listeners (in front of both ElectrumX
//! servers of the stack). Every answer must be equal, framing included:
//! one text message per answer, no newline. Then both sides are notified
//! of the same new block and the same new status.
//!
//! `interop/run.sh` brings the stack up (ElectrumX 1 also serves `ws://`)
//! and runs this with `--ignored` before the main interop test; plain
//! `cargo test` skips it.
mod support;

use futures_util::SinkExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::process::Command;
use support::ws::{next_message, open, Raw};
use tokio_tungstenite::tungstenite::Message;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this test needs the stack of interop/run.sh (run that script)")
    })
}

/// The stack's control script; its stdout is one JSON value.
fn ctl(args: &[&str]) -> Value {
    let out = Command::new(env("INTEROP_CTL"))
        .args(args)
        .output()
        .expect("run the interop control script");
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or(Value::Null)
}

/// The Electrum scripthash of an address the node knows.
fn scripthash_of(address: &str) -> String {
    let info = ctl(&["rpc", "validateaddress", address]);
    let script = hex::decode(info["scriptPubKey"].as_str().unwrap()).unwrap();
    let mut hash = Sha256::digest(script).to_vec();
    hash.reverse();
    hex::encode(hash)
}

/// Send one message, read one: the answer must be one text message
/// without a newline, holding one JSON value.
async fn ask(ws: &mut Raw, text: &str) -> Value {
    ws.send(Message::text(text)).await.unwrap();
    next_answer(ws).await
}

async fn next_answer(ws: &mut Raw) -> Value {
    match next_message(ws).await {
        Some(Message::Text(t)) => {
            assert!(!t.ends_with('\n'), "an answer ends with a newline: {t}");
            serde_json::from_str(&t).unwrap_or_else(|e| panic!("not one JSON value ({e}): {t}"))
        }
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// What must match: the whole message, except what describes the server,
/// and the order of a batch's answers (ElectrumX sends them as they
/// complete, electrum-lb in request order; JSON-RPC allows both).
fn comparable(request: &Value, mut answer: Value) -> Value {
    if let Some(members) = answer.as_array_mut() {
        members.sort_by_key(|m| m["id"].to_string());
    }
    match request["method"].as_str() {
        Some("server.version") => answer["result"][0] = json!("(server name)"),
        // A parse error's wording is the server's own; its code is not.
        _ if request.is_null() => {
            answer["error"]["message"] = json!("(message)");
        }
        _ => {}
    }
    answer
}

#[tokio::test]
#[ignore = "needs the real stack: run interop/run.sh"]
async fn the_same_websocket_session_direct_and_through_electrum_lb() {
    let direct_url = env("INTEROP_ELECTRUMX_WS_URL");
    let proxied = [env("INTEROP_WS_URL"), env("INTEROP_WSS_URL")];
    let miner = env("INTEROP_MINER_ADDRESS");
    let sh = scripthash_of(&miner);

    // The miner's history, for the requests below (its own session:
    // ElectrumX answers a second server.version with an error).
    let height = ctl(&["rpc", "getblockcount"]).as_u64().unwrap();
    let history = {
        let mut probe = open(&direct_url, &[])
            .await
            .expect("ElectrumX's ws service");
        let hello =
            json!({"jsonrpc":"2.0","id":0,"method":"server.version","params":["interop ws","1.4"]});
        let v = ask(&mut probe, &hello.to_string()).await;
        assert_eq!(v["result"][1], "1.4", "{v}");
        let get = json!({"jsonrpc":"2.0","id":0,"method":"blockchain.scripthash.get_history","params":[sh]});
        ask(&mut probe, &get.to_string()).await["result"].clone()
    };
    let first_tx = history[0]["tx_hash"].as_str().unwrap().to_string();
    let first_height = history[0]["height"].as_u64().unwrap();

    let mut direct = open(&direct_url, &[])
        .await
        .expect("ElectrumX's ws service");
    let mut through = Vec::new();
    for url in &proxied {
        through.push(
            open(url, &[])
                .await
                .expect("electrum-lb's WebSocket listener"),
        );
    }
    let requests: Vec<(Value, String)> = [
        json!({"jsonrpc":"2.0","id":1,"method":"server.version","params":["interop ws","1.4"]}),
        json!({"jsonrpc":"2.0","id":2,"method":"server.ping","params":[]}),
        json!({"jsonrpc":"2.0","id":3,"method":"blockchain.headers.subscribe","params":[]}),
        json!({"jsonrpc":"2.0","id":4,"method":"blockchain.block.header","params":[1]}),
        json!({"jsonrpc":"2.0","id":5,"method":"blockchain.block.headers","params":[0, 10]}),
        json!({"jsonrpc":"2.0","id":6,"method":"blockchain.block.header","params":[5, height]}),
        json!({"jsonrpc":"2.0","id":"seven","method":"blockchain.scripthash.subscribe","params":[sh]}),
        json!({"jsonrpc":"2.0","id":8,"method":"blockchain.scripthash.get_history","params":[sh]}),
        json!({"jsonrpc":"2.0","id":9,"method":"blockchain.scripthash.get_balance","params":[sh]}),
        json!({"jsonrpc":"2.0","id":10,"method":"blockchain.scripthash.listunspent","params":[sh]}),
        json!({"jsonrpc":"2.0","id":11,"method":"blockchain.transaction.get","params":[first_tx]}),
        json!({"jsonrpc":"2.0","id":12,"method":"blockchain.transaction.get","params":[first_tx, true]}),
        json!({"jsonrpc":"2.0","id":13,"method":"blockchain.transaction.get_merkle","params":[first_tx, first_height]}),
        json!({"jsonrpc":"2.0","id":14,"method":"blockchain.transaction.id_from_pos","params":[first_height, 0, true]}),
        json!({"jsonrpc":"2.0","id":15,"method":"blockchain.estimatefee","params":[2]}),
        json!({"jsonrpc":"2.0","id":16,"method":"blockchain.relayfee","params":[]}),
        json!({"jsonrpc":"2.0","id":17,"method":"mempool.get_fee_histogram","params":[]}),
        json!({"jsonrpc":"2.0","id":18,"method":"no.such.method","params":[]}),
        json!({"jsonrpc":"2.0","id":19,"method":"blockchain.block.header","params":[height + 1000]}),
        json!([
            {"jsonrpc":"2.0","id":20,"method":"blockchain.scripthash.get_balance","params":[sh]},
            {"jsonrpc":"2.0","id":21,"method":"blockchain.block.header","params":[2]},
            {"jsonrpc":"2.0","id":22,"method":"server.ping","params":[]}
        ]),
    ]
    .into_iter()
    .map(|r| {
        let text = r.to_string();
        (r, text)
    })
    .chain([(Value::Null, "{\"id\":23,".to_string())])
    .collect();

    for (request, text) in &requests {
        let want = comparable(request, ask(&mut direct, text).await);
        for (url, ws) in proxied.iter().zip(through.iter_mut()) {
            let got = comparable(request, ask(ws, text).await);
            assert_eq!(got, want, "{url}: {text}");
        }
        eprintln!("equal over ws: {text:.100}");
    }

    // One new block: a header notification, and the miner's new coinbase
    // changes its status. Both arrive alike on each side (in either order).
    ctl(&["rpc", "generatetoaddress", "1", &miner]);
    let want = two_notifications(&mut direct).await;
    assert_eq!(
        want["blockchain.headers.subscribe"][0]["height"],
        height + 1,
        "{want:?}"
    );
    assert_eq!(
        want["blockchain.scripthash.subscribe"][0],
        json!(sh),
        "{want:?}"
    );
    for (url, ws) in proxied.iter().zip(through.iter_mut()) {
        assert_eq!(two_notifications(ws).await, want, "{url}");
    }
    eprintln!("equal over ws: the notifications of block {}", height + 1);
}

/// The next two notifications, by method.
async fn two_notifications(ws: &mut Raw) -> BTreeMap<String, Value> {
    let mut seen = BTreeMap::new();
    for _ in 0..2 {
        let v = next_answer(ws).await;
        assert!(v.get("id").is_none(), "not a notification: {v}");
        seen.insert(
            v["method"].as_str().unwrap().to_string(),
            v["params"].clone(),
        );
    }
    seen
}
