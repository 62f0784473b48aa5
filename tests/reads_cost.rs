//! What scripthash reads cost the upstream: requests the mock received per
//! request the proxy answered, for two workloads, with read-driven
//! subscriptions on (the default) and off. Counts, not times: the figures
//! are printed (`cargo test --test reads_cost -- --nocapture`) and the
//! assertions bound them.
//!
//! - `histories`: the benchmark's "uncached get_history": 16 connections,
//!   8 requests in flight each, reading the histories of 500
//!   scripthashes nobody subscribed to, 500 reads per connection (16 reads
//!   of each scripthash in all).
//! - `wallets`: 16 wallets of 20 scripthashes each (their own): subscribe,
//!   read history, unspents and balance of each (a first sync), then 5 of
//!   each wallet's scripthashes change and the wallet re-reads their
//!   histories when notified, then it syncs again.

mod support;

use electrum_lb::Server;
use serde_json::json;
use std::collections::HashSet;
use support::mock::Mock;
use support::*;

const HISTORY: &str = "blockchain.scripthash.get_history";
const CONNECTIONS: usize = 16;
const IN_FLIGHT: usize = 8;
const SCRIPTS: usize = 500;
const READS_PER_CONNECTION: usize = 500;

async fn proxy(mock: &Mock, cache: &str) -> Server {
    let text = config_multi("", &[("test", vec![format!("{:?}", mock.url())], "")]);
    let server = start_proxy(&format!("{text}\n[cache]\n{cache}\n")).await;
    wait_ready(&server, "test").await;
    server
}

/// Scripthash requests the mock received: reads, subscribes, unsubscribes.
fn scripthash_requests(mock: &Mock) -> u64 {
    [
        HISTORY,
        "blockchain.scripthash.listunspent",
        "blockchain.scripthash.get_balance",
        "blockchain.scripthash.get_mempool",
        "blockchain.scripthash.subscribe",
        "blockchain.scripthash.unsubscribe",
    ]
    .iter()
    .map(|m| mock.count(m))
    .sum()
}

/// Send `requests` (method, scripthash) with `IN_FLIGHT` in flight; every
/// answer must be a result.
async fn pipeline(c: &mut Client, requests: &[(&str, String)]) {
    for (chunk_no, chunk) in requests.chunks(IN_FLIGHT).enumerate() {
        let mut ids = HashSet::new();
        for (i, (method, sh)) in chunk.iter().enumerate() {
            let id = chunk_no * IN_FLIGHT + i;
            ids.insert(id as u64);
            c.send(&json!({"id": id, "method": method, "params": [sh]}))
                .await;
        }
        while !ids.is_empty() {
            let v = c.recv().await;
            if let Some(id) = v["id"].as_u64() {
                assert!(v.get("error").is_none(), "{v}");
                ids.remove(&id);
            }
        }
    }
}

/// Upstream requests per answered request for the `histories` workload.
async fn histories(cache: &str) -> (u64, u64) {
    let mock = Mock::start().await;
    for i in 0..SCRIPTS {
        mock.set_history_silently(&scripthash(i), vec![(txid(i), 10 + (i % 50) as i64)]);
    }
    let server = proxy(&mock, cache).await;
    let addr = tcp_addr(&server, "test");
    let before = scripthash_requests(&mock);
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..CONNECTIONS {
        tasks.spawn(async move {
            let mut c = Client::connect(addr).await;
            // A fixed pseudo-random order per connection.
            let mut x = 0x9e37_79b9_u64.wrapping_mul(conn as u64 + 1);
            let requests: Vec<(&str, String)> = (0..READS_PER_CONNECTION)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (HISTORY, scripthash((x >> 33) as usize % SCRIPTS))
                })
                .collect();
            pipeline(&mut c, &requests).await;
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let upstream = scripthash_requests(&mock) - before;
    server.shutdown().await;
    (upstream, (CONNECTIONS * READS_PER_CONNECTION) as u64)
}

/// Upstream requests per answered request for the `wallets` workload.
async fn wallets(cache: &str) -> (u64, u64) {
    let mock = std::sync::Arc::new(Mock::start().await);
    for w in 0..CONNECTIONS {
        for i in 0..SCRIPTS_PER_WALLET {
            mock.set_history_silently(&wallet_script(w, i), vec![(txid(w * 100 + i), 20)]);
        }
    }
    let server = proxy(&mock, cache).await;
    let addr = tcp_addr(&server, "test");
    let before = scripthash_requests(&mock);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..CONNECTIONS {
        let mock = mock.clone();
        tasks.spawn(async move {
            let mut c = Client::connect(addr).await;
            let subs: Vec<_> = (0..SCRIPTS_PER_WALLET)
                .map(|i| ("blockchain.scripthash.subscribe", wallet_script(w, i)))
                .collect();
            pipeline(&mut c, &subs).await;
            pipeline(&mut c, &sync(w)).await;
            for i in 0..CHANGED {
                let sh = wallet_script(w, i);
                mock.set_history(&sh, vec![(txid(w * 100 + i), 20), (txid(99_999), 0)]);
                c.notification("blockchain.scripthash.subscribe").await;
                c.call(HISTORY, json!([sh])).await;
            }
            pipeline(&mut c, &sync(w)).await;
            // The session stays open until counted: a wallet leaving costs
            // its unsubscribes, which are not part of this workload.
            ((subs.len() + 2 * sync(w).len() + CHANGED) as u64, c)
        });
    }
    let mut answered = 0;
    let mut sessions = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (n, c) = r.unwrap();
        answered += n;
        sessions.push(c);
    }
    let upstream = scripthash_requests(&mock) - before;
    server.shutdown().await;
    (upstream, answered)
}

const SCRIPTS_PER_WALLET: usize = 20;
const CHANGED: usize = 5;

fn wallet_script(w: usize, i: usize) -> String {
    scripthash(10_000 + w * SCRIPTS_PER_WALLET + i)
}

/// A wallet's sync: the history, unspents and balance of each script.
fn sync(w: usize) -> Vec<(&'static str, String)> {
    let mut r = Vec::new();
    for method in [
        HISTORY,
        "blockchain.scripthash.listunspent",
        "blockchain.scripthash.get_balance",
    ] {
        for i in 0..SCRIPTS_PER_WALLET {
            r.push((method, wallet_script(w, i)));
        }
    }
    r
}

fn report(workload: &str, setting: &str, (upstream, answered): (u64, u64)) -> f64 {
    let ratio = upstream as f64 / answered as f64;
    eprintln!(
        "reads_cost: {workload:9} {setting:24} upstream {upstream:6} / answered {answered:6} = {ratio:.3}"
    );
    ratio
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_requests_per_answered_request() {
    let off = report(
        "histories",
        "read_subscriptions = 0",
        histories("read_subscriptions = 0").await,
    );
    let on = report("histories", "default (1000)", histories("").await);
    // Without a subscription every history is read upstream, but for
    // identical reads that met in flight.
    assert!(off <= 1.0 && off > 0.5, "{off}");
    // With them, each scripthash costs a few requests (a read, the
    // subscribe, the read it keeps), then nothing.
    assert!(on < 0.5 * off, "{on} against {off}");
    let w_off = report(
        "wallets",
        "read_subscriptions = 0",
        wallets("read_subscriptions = 0").await,
    );
    let w_on = report("wallets", "default (1000)", wallets("").await);
    // Wallets subscribe themselves: the second sync and the balances and
    // unspents of unchanged scripthashes come from memory either way.
    assert!(w_on < 0.7 && w_off < 0.7, "{w_on} {w_off}");
}
