//! The mock as an ElectrumX 2.0 (`MockOptions::protocol_max`): protocol
//! negotiation per connection, and each level's methods as ElectrumX 2.0's
//! `set_request_handlers` lays them out (`electrumx/server/session.py`):
//!
//! - below 1.6: `blockchain.relayfee`; `blockchain.block.headers` as `hex`;
//! - from 1.6: `mempool.get_info`, `broadcast_package`, headers as a list,
//!   no `relayfee`;
//! - below 1.7: `blockchain.scripthash.*`;
//! - from 1.7: `blockchain.scriptpubkey.*` (notifications
//!   `blockchain.scriptpubkey.subscribe [scripthash, status]`),
//!   `blockchain.outpoint.*`, `testmempoolaccept`, `mempool.recent`,
//!   `server.ping(pong_len, data)`, no `hash_function` in features.
//!
//! Outpoint statuses are computed from the mock's raw transactions and
//! histories: the funder's height from the history it appears in, the
//! spender from a stored transaction whose input spends it.

use super::methods::Answer;
use super::{hash_hex, status_of, txid_of, Chain, Shared};
use electrum_client::bitcoin::consensus::deserialize;
use electrum_client::bitcoin::Transaction;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::Ordering;

type Version = (u32, u32, u32);

fn parse_version(s: &str) -> Option<Version> {
    let mut parts = s.split('.').map(|p| p.parse::<u32>().ok());
    let v = (
        parts.next()??,
        parts.next().unwrap_or(Some(0))?,
        parts.next().unwrap_or(Some(0))?,
    );
    Some(v)
}

/// "1.4", "1.4.2": ElectrumX's `version_string` of a tuple (no trailing .0
/// beyond what was asked; a third part only when not zero here).
pub(super) fn version_string(v: Version) -> String {
    if v.2 == 0 {
        format!("{}.{}", v.0, v.1)
    } else {
        format!("{}.{}.{}", v.0, v.1, v.2)
    }
}

/// ElectrumX's `protocol_version`: the highest common version, or an error.
fn negotiate(max: Version, requested: &Value) -> Result<Version, String> {
    const MIN: Version = (1, 4, 0);
    let (cmin, cmax) = match requested {
        Value::Array(pair) if pair.len() == 2 => (
            pair[0].as_str().and_then(parse_version),
            pair[1].as_str().and_then(parse_version),
        ),
        Value::String(s) => (parse_version(s), parse_version(s)),
        Value::Null => (Some(MIN), Some(MIN)),
        _ => (None, None),
    };
    let (Some(cmin), Some(cmax)) = (cmin, cmax) else {
        return Err(format!("unsupported protocol version: {requested}"));
    };
    let chosen = cmax.min(max);
    if chosen < cmin.max(MIN) {
        return Err(format!("unsupported protocol version: {requested}"));
    }
    Ok(chosen)
}

fn unknown(method: &str) -> Answer {
    Err((-32601, format!("unknown method \"{method}\"")))
}

/// The scripthash of a script given as hex.
fn spk_hash(spk: &str) -> Result<String, (i64, String)> {
    let script = hex::decode(spk).map_err(|_| (1, format!("{spk} should be a hex string")))?;
    let mut h = Sha256::digest(&script).to_vec();
    h.reverse();
    Ok(hex::encode(h))
}

fn history_json(h: &[(String, i64)], fees: bool) -> Value {
    json!(h
        .iter()
        .map(|(t, height)| if fees && *height <= 0 {
            json!({"tx_hash": t, "height": height, "fee": 100})
        } else {
            json!({"tx_hash": t, "height": height})
        })
        .collect::<Vec<_>>())
}

/// The outpoint's status, as ElectrumX 2.0 writes it.
fn outpoint_status(chain: &Chain, txid: &str, vout: u32) -> Value {
    let height_of = |t: &str| {
        chain
            .histories
            .values()
            .flat_map(|h| h.iter())
            .find(|(id, _)| id == t)
            .map(|(_, h)| *h)
    };
    let tx_of = |t: &str| {
        chain
            .txs
            .get(t)
            .and_then(|raw| deserialize::<Transaction>(&hex::decode(raw).ok()?).ok())
    };
    let (Some(funder), Some(tx)) = (height_of(txid), tx_of(txid)) else {
        return json!({});
    };
    if tx.output.len() <= vout as usize {
        return json!({});
    }
    let spender = chain.txs.keys().find_map(|id| {
        let tx = tx_of(id)?;
        let spends = tx
            .input
            .iter()
            .any(|i| i.previous_output.txid.to_string() == txid && i.previous_output.vout == vout);
        if !spends {
            return None;
        }
        Some((id.clone(), height_of(id)?))
    });
    match spender {
        Some((id, h)) => {
            json!({"funder_height": funder, "spender_txhash": id, "spender_height": h})
        }
        None => json!({"funder_height": funder}),
    }
}

/// After any change: send each outpoint subscriber the statuses that
/// changed since it was last told.
pub(super) fn notify_outpoints(shared: &Shared) {
    let chain = shared.chain.lock().unwrap();
    let mut conns = shared.conns.lock().unwrap();
    for c in conns.values_mut() {
        let tx = c.tx.clone();
        for ((txid, vout), last) in c.outpoints.iter_mut() {
            let now = outpoint_status(&chain, txid, *vout);
            if now != *last {
                *last = now.clone();
                let line = json!({"jsonrpc":"2.0","method":"blockchain.outpoint.subscribe","params":[txid, vout, now]});
                let _ = tx.send(line.to_string());
            }
        }
    }
}

/// The answer of a method whose handling depends on the connection's
/// level, or `None` to use the 1.4 table.
pub(super) fn answer(
    shared: &Shared,
    conn: u64,
    method: &str,
    params: &Value,
    chain: &mut Chain,
) -> Option<Answer> {
    let max = shared
        .opts
        .protocol_max
        .as_deref()
        .and_then(parse_version)
        .expect("a protocol_max version");
    let p = |i: usize| params.get(i).cloned().unwrap_or(Value::Null);
    if method == "server.version" {
        return Some(match negotiate(max, &p(1)) {
            Ok(level) => {
                if let Some(c) = shared.conns.lock().unwrap().get_mut(&conn) {
                    c.level = level;
                }
                Ok(json!(["MockX 2.0", version_string(level)]))
            }
            Err(e) => Err((1, e)),
        });
    }
    let level = shared.conns.lock().unwrap().get(&conn).map(|c| c.level)?;
    let v16 = level >= (1, 6, 0);
    let v17 = level >= (1, 7, 0);
    let refused = shared.outpoint_refusal.load(Ordering::SeqCst);
    Some(match method {
        "server.features" => {
            let mut f = json!({
                "genesis_hash": hash_hex(super::sha256d(&chain.headers[0])),
                "protocol_min": "1.4", "protocol_max": version_string(max),
                "server_version": "MockX 2.0", "hosts": {}, "pruning": null,
                "services": [], "hash_function": "sha256",
            });
            if v17 {
                f.as_object_mut().unwrap().remove("hash_function");
            }
            Ok(f)
        }
        "server.ping" if v17 => {
            let n = p(0).as_u64().unwrap_or(0) as usize;
            Ok(json!({"data": "0".repeat(n)}))
        }
        "blockchain.relayfee" if v16 => unknown(method),
        "mempool.get_info" | "blockchain.transaction.broadcast_package" if !v16 => unknown(method),
        "mempool.get_info" => Ok(json!({
            "mempoolminfee": 0.00001, "minrelaytxfee": 0.00001, "incrementalrelayfee": 0.00001
        })),
        "blockchain.transaction.broadcast_package" => {
            let raws: Vec<String> = serde_json::from_value(p(0)).unwrap_or_default();
            if raws.is_empty() || raws.iter().any(|r| hex::decode(r).is_err()) {
                return Some(Err((
                    1,
                    "the tx package was rejected by network rules.".into(),
                )));
            }
            for raw in raws {
                let txid = txid_of(&raw);
                chain.txs.insert(txid.clone(), raw);
                chain.recent.push(txid);
            }
            Ok(json!({"success": true}))
        }
        "blockchain.block.headers" if v16 => {
            let start = p(0).as_u64().unwrap_or(0) as usize;
            let count = p(1).as_u64().unwrap_or(0) as usize;
            let end = (start + count.min(2016)).min(chain.headers.len());
            let headers: Vec<String> = chain
                .headers
                .get(start..end)
                .unwrap_or(&[])
                .iter()
                .map(hex::encode)
                .collect();
            Ok(json!({"count": headers.len(), "max": 2016, "headers": headers}))
        }
        "blockchain.estimatefee" if p(1).is_string() => Ok(json!(0.0002)),
        m if m.starts_with("blockchain.scripthash.") && v17 => unknown(method),
        m if (m.starts_with("blockchain.scriptpubkey.")
            || m.starts_with("blockchain.outpoint.")
            || m == "mempool.recent"
            || m == "blockchain.transaction.testmempoolaccept")
            && !v17 =>
        {
            unknown(method)
        }
        "mempool.recent" => Ok(json!(chain
            .recent
            .iter()
            .rev()
            .take(10)
            .map(|t| json!({"txid": t, "fee": 100, "vsize": 200}))
            .collect::<Vec<_>>())),
        "blockchain.transaction.testmempoolaccept" => {
            let raws: Vec<String> = serde_json::from_value(p(0)).unwrap_or_default();
            Ok(json!(raws
                .iter()
                .map(|r| json!({"txid": txid_of(r), "wtxid": txid_of(r), "allowed": true}))
                .collect::<Vec<_>>()))
        }
        m if m.starts_with("blockchain.scriptpubkey.") => {
            let sh = match p(0).as_str().map(spk_hash) {
                Some(Ok(sh)) => sh,
                Some(Err(e)) => return Some(Err(e)),
                None => return Some(Err((1, "bad script".into()))),
            };
            let h = chain.histories.get(&sh).cloned().unwrap_or_default();
            match &m["blockchain.scriptpubkey.".len()..] {
                "subscribe" => {
                    if let Some(c) = shared.conns.lock().unwrap().get_mut(&conn) {
                        c.subs.insert(sh);
                    }
                    Ok(json!(status_of(&h)))
                }
                "unsubscribe" => Ok(json!(shared
                    .conns
                    .lock()
                    .unwrap()
                    .get_mut(&conn)
                    .is_some_and(|c| c.subs.remove(&sh)))),
                "get_history" => Ok(json!({"history": history_json(&h, true)})),
                "get_mempool" => {
                    let mem: Vec<_> = h.into_iter().filter(|(_, x)| *x <= 0).collect();
                    Ok(json!({"history": history_json(&mem, true)}))
                }
                "get_balance" => Ok(json!({
                    "confirmed": h.iter().filter(|(_, x)| *x > 0).count() as u64 * 1000,
                    "unconfirmed": h.iter().filter(|(_, x)| *x <= 0).count() as u64 * 1000,
                })),
                "listunspent" => Ok(json!({"utxos": h
                    .iter()
                    .map(|(t, height)| json!({"tx_hash": t, "tx_pos": 0, "height": height, "value": 1000}))
                    .collect::<Vec<_>>()})),
                _ => unknown(method),
            }
        }
        "blockchain.outpoint.subscribe" | "blockchain.outpoint.get_status" if refused => Err((
            2,
            "daemon error: {'code': -32601, 'message': 'Method not found'}".into(),
        )),
        "blockchain.outpoint.subscribe" | "blockchain.outpoint.get_status" => {
            let (Some(txid), Some(vout)) = (p(0).as_str().map(str::to_string), p(1).as_u64())
            else {
                return Some(Err((1, "bad outpoint".into())));
            };
            if !p(2).is_string() {
                // ElectrumX 2.0 takes the script hint positionally.
                return Some(Err((-32602, "invalid params: spk_hint missing".into())));
            }
            let status = outpoint_status(chain, &txid, vout as u32);
            if method == "blockchain.outpoint.subscribe" {
                if let Some(c) = shared.conns.lock().unwrap().get_mut(&conn) {
                    c.outpoints.insert((txid, vout as u32), status.clone());
                }
            }
            Ok(status)
        }
        "blockchain.outpoint.unsubscribe" => {
            let txid = p(0).as_str().unwrap_or_default().to_string();
            let vout = p(1).as_u64().unwrap_or(0) as u32;
            Ok(json!(shared
                .conns
                .lock()
                .unwrap()
                .get_mut(&conn)
                .is_some_and(|c| c
                    .outpoints
                    .remove(&(txid, vout))
                    .is_some())))
        }
        _ => return None,
    })
}
