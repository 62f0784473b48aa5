//! The mock's protocol-1.4 method table (see `mock.rs`).

use super::levels;
use super::{hash_hex, sha256d, status_of, txid_of, Shared};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

pub(super) type Answer = Result<Value, (i64, String)>;

pub(super) fn answer(shared: &Shared, conn: u64, req: &Value) -> Answer {
    let method = req["method"].as_str().unwrap_or_default();
    let params = req.get("params").cloned().unwrap_or(json!([]));
    let p = |i: usize| params.get(i).cloned().unwrap_or(Value::Null);
    let sh = || {
        p(0).as_str()
            .map(str::to_string)
            .ok_or((1, "bad scripthash".to_string()))
    };
    if shared.opts.refuse.contains(&method) {
        return Err((-32601, format!("unknown method \"{method}\"")));
    }
    let mut chain = shared.chain.lock().unwrap();
    if shared.opts.protocol_max.is_some() {
        if let Some(a) = levels::answer(shared, conn, method, &params, &mut chain) {
            return a;
        }
    }
    if shared.protocol_1_6.load(Ordering::SeqCst) {
        match method {
            "server.version" => return Ok(json!(["MockX 1.0", "1.6"])),
            "blockchain.relayfee" => {
                return Err((-32601, format!("unknown method \"{method}\"")));
            }
            "mempool.get_info" => {
                return Ok(json!({
                    "mempoolminfee": 0.00003, "minrelaytxfee": 0.00002,
                    "incrementalrelayfee": 0.00001
                }));
            }
            "blockchain.block.headers" => {
                let start = p(0).as_u64().ok_or((1, "bad height".to_string()))? as usize;
                let count = p(1).as_u64().unwrap_or(0) as usize;
                let end = (start + count.min(2016)).min(chain.headers.len());
                let headers: Vec<String> = chain
                    .headers
                    .get(start..end)
                    .unwrap_or(&[])
                    .iter()
                    .map(hex::encode)
                    .collect();
                return Ok(json!({"headers": headers, "count": headers.len(), "max": 2016}));
            }
            _ => {}
        }
    }
    match method {
        // Like ElectrumX at protocol_max 1.4.2: 1.4.2 when the range asked
        // reaches it, 1.4 otherwise.
        "server.version" => {
            let reaches = p(1)
                .as_array()
                .and_then(|r| r.last()?.as_str().map(str::to_string));
            Ok(json!([
                "MockX 1.0",
                if reaches.as_deref() == Some("1.4.2") {
                    "1.4.2"
                } else {
                    "1.4"
                }
            ]))
        }
        "server.features" => Ok(json!({
            "genesis_hash": hash_hex(sha256d(&chain.headers[0])),
            "protocol_min": "1.4", "protocol_max": "1.4.2", "hash_function": "sha256",
            "server_version": "MockX 1.0", "hosts": {}, "pruning": null
        })),
        "server.ping" => Ok(Value::Null),
        "blockchain.headers.subscribe" => {
            if let Some(c) = shared.conns.lock().unwrap().get_mut(&conn) {
                c.headers = true;
            }
            let (height, hex) = chain.tip();
            Ok(json!({"hex": hex, "height": height}))
        }
        "blockchain.block.header" => {
            let h = p(0).as_u64().ok_or((1, "bad height".to_string()))? as usize;
            chain
                .headers
                .get(h)
                .map(|x| json!(hex::encode(x)))
                .ok_or((1, format!("height {h} out of range")))
        }
        "blockchain.block.headers" => {
            let start = p(0).as_u64().ok_or((1, "bad height".to_string()))? as usize;
            let count = p(1).as_u64().unwrap_or(0) as usize;
            let end = (start + count.min(2016)).min(chain.headers.len());
            let hex: String = chain
                .headers
                .get(start..end)
                .unwrap_or(&[])
                .iter()
                .map(hex::encode)
                .collect();
            Ok(json!({"hex": hex, "count": end.saturating_sub(start), "max": 2016}))
        }
        "blockchain.scripthash.subscribe" => {
            let sh = sh()?;
            if let Some(c) = shared.conns.lock().unwrap().get_mut(&conn) {
                c.subs.insert(sh.clone());
            }
            Ok(json!(status_of(
                chain.histories.get(&sh).map(Vec::as_slice).unwrap_or(&[])
            )))
        }
        "blockchain.scripthash.unsubscribe" => {
            let sh = sh()?;
            let removed = shared
                .conns
                .lock()
                .unwrap()
                .get_mut(&conn)
                .map(|c| c.subs.remove(&sh))
                .unwrap_or(false);
            Ok(json!(removed))
        }
        "blockchain.scripthash.get_history" => {
            let h = chain.histories.get(&sh()?).cloned().unwrap_or_default();
            Ok(json!(h
                .iter()
                .map(|(t, height)| json!({"tx_hash": t, "height": height}))
                .collect::<Vec<_>>()))
        }
        "blockchain.scripthash.get_mempool" => {
            let h = chain.histories.get(&sh()?).cloned().unwrap_or_default();
            Ok(json!(h
                .iter()
                .filter(|(_, height)| *height <= 0)
                .map(|(t, height)| json!({"tx_hash": t, "height": height, "fee": 100}))
                .collect::<Vec<_>>()))
        }
        "blockchain.scripthash.get_balance" => {
            let h = chain.histories.get(&sh()?).cloned().unwrap_or_default();
            let confirmed = h.iter().filter(|(_, x)| *x > 0).count() as u64 * 1000;
            let unconfirmed = h.iter().filter(|(_, x)| *x <= 0).count() as u64 * 1000;
            Ok(json!({"confirmed": confirmed, "unconfirmed": unconfirmed}))
        }
        "blockchain.scripthash.listunspent" => {
            let h = chain.histories.get(&sh()?).cloned().unwrap_or_default();
            Ok(json!(h
                .iter()
                .map(|(t, height)| json!({"tx_hash": t, "tx_pos": 0, "height": height, "value": 1000}))
                .collect::<Vec<_>>()))
        }
        "blockchain.transaction.get" => {
            let txid = p(0).as_str().unwrap_or_default().to_string();
            // ElectrumX refuses a `verbose` that is not a boolean (such as
            // protocol 1.0's height argument).
            if shared.opts.strict && !p(1).is_null() && !p(1).is_boolean() {
                return Err((1, "\"verbose\" must be a boolean".into()));
            }
            if p(1).as_bool() == Some(true) {
                return Err((
                    2,
                    "verbose transactions are not supported by the mock".into(),
                ));
            }
            chain.txs.get(&txid).map(|h| json!(h)).ok_or((
                2,
                format!("no such mempool or blockchain transaction: {txid}"),
            ))
        }
        "blockchain.transaction.broadcast" => {
            let raw = p(0).as_str().unwrap_or_default().to_string();
            if hex::decode(&raw).is_err() || raw.is_empty() {
                return Err((1, "the transaction was rejected by network rules".into()));
            }
            let txid = txid_of(&raw);
            chain.txs.insert(txid.clone(), raw);
            chain.recent.push(txid.clone());
            Ok(json!(txid))
        }
        "blockchain.transaction.get_merkle" => {
            let height = p(1).as_u64().unwrap_or(0);
            Ok(json!({"block_height": height, "merkle": [hash_hex([7u8; 32])], "pos": 1}))
        }
        "blockchain.transaction.id_from_pos" => {
            Ok(json!(hash_hex([p(1).as_u64().unwrap_or(0) as u8; 32])))
        }
        // ElectrumX before 2.0 took no mode.
        "blockchain.estimatefee" if !p(1).is_null() => {
            Err((-32602, "invalid params: too many arguments".into()))
        }
        "blockchain.estimatefee" => Ok(json!(0.0001)),
        "blockchain.relayfee" => Ok(json!(0.00001)),
        "mempool.get_fee_histogram" => Ok(json!([[12.5, 100000], [5.0, 200000]])),
        _ => {
            let _ = &mut chain;
            Err((-32601, format!("unknown method \"{method}\"")))
        }
    }
}
