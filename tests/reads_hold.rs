//! In front of an upstream that pads its replies and holds the small ones
//! (ElectrumX 2.0: under 1 KiB waiting, nothing is sent until a second
//! after the connection's previous packet), reads that reach it are packed
//! onto the connection whose answers are already filling a packet, rather
//! than spread one per connection to wait out a hold each. The mock holds
//! like ElectrumX (`support/mock_hold.rs`) and counts where each read was
//! served and what sent each packet. Real proxy, real sockets.

mod support;

use electrum_lb::Server;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::mock::{Mock, MockOptions};
use support::*;

const READS: usize = 8;

/// A holding mock (window 2 s) behind a proxy that keeps two connections
/// to it; `hold_ms` is the proxy's `upstream_reply_hold_ms`. The cache is
/// off so every read reaches the upstream.
async fn setup(hold_ms: u64) -> (Mock, Server) {
    let mock = Mock::start_with(MockOptions {
        reply_hold: Some(Duration::from_secs(2)),
        ..Default::default()
    })
    .await;
    let upstream = upstream_toml(&mock.url(), "min_connections = 2, max_connections = 2");
    let text = config_multi(
        // The proxy's window is long, so no connection counts as quiet
        // while the test runs; no stall is declared while answers are held.
        &format!("upstream_reply_hold_ms = {hold_ms}\nupstream_stall_secs = 60\nrequest_timeout_secs = 30"),
        &[("test", vec![upstream], "")],
    );
    let server = start_proxy(&format!("{text}\n[cache]\nenabled = false\n")).await;
    let pool = &server.coins["test"].router.pool;
    wait_until(|| {
        pool.status()
            .iter()
            .map(|u| u.ready_connections)
            .sum::<usize>()
            == 2
    })
    .await;
    (mock, server)
}

/// Send `READS` distinct history reads at once and wait for every answer.
async fn read_all(server: &Server) {
    let mut c = Client::connect(tcp_addr(server, "test")).await;
    for i in 0..READS {
        c.send(&json!({"jsonrpc":"2.0","id":i,"method":"blockchain.scripthash.get_history","params":[scripthash(900 + i)]}))
            .await;
    }
    for _ in 0..READS {
        let answer = c.recv().await;
        assert_eq!(answer["result"], json!([]), "{answer}");
    }
}

#[tokio::test]
async fn reads_are_packed_onto_the_connection_whose_answers_are_filling() {
    let (mock, server) = setup(60_000).await;
    read_all(&server).await;
    // Every read on one connection, all answers in one packet.
    assert_eq!(mock.histories_by_connection(), vec![READS as u64]);
    let packets = mock.packets();
    let sent = packets.by_size.load(Ordering::SeqCst)
        + packets.by_timer.load(Ordering::SeqCst)
        + packets.after_quiet.load(Ordering::SeqCst);
    assert_eq!(sent, 1, "answers of the reads came in {sent} packets");
}

#[tokio::test]
async fn with_the_window_at_zero_reads_are_spread_by_load() {
    let (mock, server) = setup(0).await;
    read_all(&server).await;
    // Least outstanding first: the two connections take turns, and each
    // holds its share of the answers.
    assert_eq!(mock.histories_by_connection(), vec![4, 4]);
    let packets = mock.packets();
    assert_eq!(packets.by_timer.load(Ordering::SeqCst), 2);
}

#[test]
fn the_mock_pads_a_packet_before_its_last_bracket() {
    let p = support::mock::hold::pad("{\"id\":1}\n{\"id\":2}\n");
    assert_eq!(p.len(), 1024);
    assert!(p.starts_with("{\"id\":1}\n{\"id\":2"));
    assert!(p.ends_with("  }\n"));
}
