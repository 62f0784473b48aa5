//! Tests of the limits as a whole (groups, buckets, gates, reply sizes).

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn coin(config: LimitsConfig) -> Arc<CoinLimits> {
    let m = crate::metrics::Metrics::new();
    let limits = Limits::new(&config, &m.registry);
    limits.for_coin(m.coin("t"))
}

fn strict() -> LimitsConfig {
    LimitsConfig {
        exempt: vec![],
        ..LimitsConfig::default()
    }
}

#[test]
fn groups_are_prefixes() {
    let g = |s| GroupKey::of(ip(s), 24, 48);
    assert_eq!(g("203.0.113.7"), g("203.0.113.200"));
    assert_ne!(g("203.0.113.7"), g("203.0.114.7"));
    assert_eq!(g("2001:db8:1:2::1"), g("2001:db8:1:ffff::9"));
    assert_ne!(g("2001:db8:1::1"), g("2001:db8:2::1"));
    // A dual-stack listener sees IPv4 clients as mapped addresses.
    assert_eq!(g("::ffff:203.0.113.9"), g("203.0.113.1"));
    assert_eq!(g("203.0.113.7").to_string(), "203.0.113.0/24");
    assert_eq!(g("2001:db8:1:2::1").to_string(), "2001:db8:1::/48");
    // Edges: no bits is one group for everyone, all bits one per host.
    assert_eq!(
        GroupKey::of(ip("1.2.3.4"), 0, 0),
        GroupKey::of(ip("9.9.9.9"), 0, 0)
    );
    assert_ne!(
        GroupKey::of(ip("1.2.3.4"), 32, 128),
        GroupKey::of(ip("1.2.3.5"), 32, 128)
    );
}

#[test]
fn exempt_networks() {
    let n = parse_net("10.0.0.0/8").unwrap();
    assert!(n.contains(ip("10.200.1.1")));
    assert!(!n.contains(ip("11.0.0.1")));
    assert!(parse_net("::1").unwrap().contains(ip("::1")));
    assert!(parse_net("10.0.0.0/33").is_err());
    assert!(parse_net("nonsense/8").is_err());
}

#[test]
fn defaults_validate_and_contradictions_name_the_key() {
    LimitsConfig::default().validate().unwrap();
    let bad = LimitsConfig {
        session_rate: 0.0,
        ..LimitsConfig::default()
    };
    assert_eq!(bad.validate().unwrap_err().0, "limits.session_rate");
    let bad = LimitsConfig {
        exempt: vec!["10.0.0.0/8".into(), "x".into()],
        ..LimitsConfig::default()
    };
    assert_eq!(bad.validate().unwrap_err().0, "limits.exempt[1]");
}

#[test]
fn histories_cost_more_than_pings() {
    assert!(method_cost("blockchain.scripthash.get_history") > method_cost("server.ping"));
    assert!(
        method_cost("blockchain.transaction.broadcast") > method_cost("blockchain.block.header")
    );
    assert_eq!(method_cost("no.such.method"), 10.0);
}

#[test]
fn total_and_group_sessions() {
    let c = coin(LimitsConfig {
        max_sessions: 3,
        max_sessions_per_group: 2,
        ..strict()
    });
    let a = c.connection().unwrap().admit(ip("198.51.100.1")).unwrap();
    let b = c.connection().unwrap().admit(ip("198.51.100.2")).unwrap();
    let full = c
        .connection()
        .unwrap()
        .admit(ip("198.51.100.3"))
        .unwrap_err();
    assert_eq!(full.group.to_string(), "198.51.100.0/24");
    let line = String::from_utf8(full.error_line()).unwrap();
    assert!(
        line.contains("-32003") && line.contains("198.51.100.0/24"),
        "{line}"
    );
    // The refused connection still holds its slot until it is closed.
    assert!(c.connection().is_none());
    drop(full);
    let other = c.connection().unwrap().admit(ip("192.0.2.1")).unwrap();
    assert_eq!(c.limits.open_connections(), 3);
    assert!(c.connection().is_none());
    drop(a);
    let again = c.connection().unwrap().admit(ip("198.51.100.4")).unwrap();
    drop((b, other, again));
    assert_eq!(c.limits.open_connections(), 0);
}

#[test]
fn buckets_refuse_then_disconnect() {
    let c = coin(LimitsConfig {
        session_rate: 0.001,
        session_burst: 100.0,
        max_refusals: 3,
        ..strict()
    });
    let mut g = c.connection().unwrap().admit(ip("198.51.100.1")).unwrap();
    // Two histories (50 points each) fit, the third does not.
    g.admit("blockchain.scripthash.get_history").unwrap();
    g.admit("blockchain.scripthash.get_history").unwrap();
    let r = g.admit("blockchain.scripthash.get_history").unwrap_err();
    assert_eq!(r.error.code, ErrorCode::LimitExceeded);
    assert!(!r.disconnect);
    assert!(
        r.error.message.contains("this session"),
        "{}",
        r.error.message
    );
    assert!(g.admit("server.ping").is_err());
    let r = g.admit("server.ping").unwrap_err();
    assert!(r.disconnect, "{r:?}");
    assert!(r.error.message.contains("closing"), "{}", r.error.message);
}

#[test]
fn bytes_are_charged() {
    let c = coin(LimitsConfig {
        session_rate: 0.001,
        session_burst: 100.0,
        bytes_per_point: 1000,
        ..strict()
    });
    let mut g = c.connection().unwrap().admit(ip("198.51.100.1")).unwrap();
    // 95 KB of replies leave 5 points: one ping fits, a header does not.
    g.reply_limits().sent(95_000);
    g.admit("server.ping").unwrap();
    assert!(g.admit("blockchain.block.header").is_err());
}

#[test]
fn the_group_bucket_is_shared() {
    let c = coin(LimitsConfig {
        group_rate: 0.001,
        group_burst: 30.0,
        ..strict()
    });
    let mut a = c.connection().unwrap().admit(ip("198.51.100.1")).unwrap();
    let mut b = c.connection().unwrap().admit(ip("198.51.100.2")).unwrap();
    a.admit("blockchain.block.header").unwrap();
    a.admit("blockchain.block.header").unwrap();
    b.admit("blockchain.block.header").unwrap();
    let r = b.admit("blockchain.block.header").unwrap_err();
    assert!(
        r.error.message.contains("198.51.100.0/24"),
        "{}",
        r.error.message
    );
    // Another network is not affected.
    let mut other = c.connection().unwrap().admit(ip("192.0.2.1")).unwrap();
    other.admit("blockchain.block.header").unwrap();
}

#[test]
fn exempt_clients_skip_groups_and_buckets() {
    let c = coin(LimitsConfig {
        max_sessions_per_group: 1,
        session_rate: 0.001,
        session_burst: 10.0,
        ..LimitsConfig::default()
    });
    let mut a = c.connection().unwrap().admit(ip("127.0.0.1")).unwrap();
    let _b = c.connection().unwrap().admit(ip("127.0.0.2")).unwrap();
    for _ in 0..100 {
        a.admit("blockchain.scripthash.get_history").unwrap();
    }
    assert_eq!(a.group(), None);
    assert_eq!(c.limits.groups(), 0);
}

#[test]
fn oversized_replies_keep_their_ids() {
    let big = format!(
        r#"{{"jsonrpc":"2.0","result":"{}","id":"a\"b"}}"#,
        "x".repeat(100)
    );
    let line = String::from_utf8(oversized_reply(big.as_bytes(), 50).unwrap()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["id"], "a\"b");
    assert_eq!(v["error"]["code"], -32003);
    let batch = format!(
        r#"[{{"jsonrpc":"2.0","result":"{}","id":1}},{{"jsonrpc":"2.0","result":2,"id":2}}]"#,
        "x".repeat(100)
    );
    let line = String::from_utf8(oversized_reply(batch.as_bytes(), 50).unwrap()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v[0]["id"], 1);
    assert_eq!(v[1]["id"], 2);
    assert_eq!(v[1]["error"]["code"], -32003);
    let note = r#"{"jsonrpc":"2.0","method":"blockchain.headers.subscribe","params":[{}]}"#;
    assert_eq!(oversized_reply(note.as_bytes(), 10), None);
    let junk = oversized_reply(b"\xff not json", 5).unwrap();
    assert!(String::from_utf8(junk).unwrap().contains("\"id\":null"));
}
