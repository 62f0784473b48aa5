//! Outpoint statuses (protocol 1.7 `blockchain.outpoint.*`): their shape,
//! and computing one from a script's history where no upstream speaks 1.7.
//!
//! Owns: [`Outpoint`] (what is watched), [`Status`] in ElectrumX 2.0's exact
//! shape (`{}` when the funding output is unknown, else `funder_height`,
//! plus `spender_txhash` and `spender_height` once it is spent; mempool
//! heights are 0, or -1 with unconfirmed inputs, as in histories), parsing
//! and params checks, and [`emulate`]: the funding output is looked up in
//! the output script's history (`blockchain.scripthash.get_history`), its
//! transaction fetched to check that output `vout` pays that script, and
//! every later transaction of the history read for an input spending it.
//! Fetching is the caller's (the hub's for subscriptions, the router's for
//! `get_status`): this module only decides.

use crate::jsonrpc::{ErrorCode, RpcError};
use crate::tx;
use serde_json::Value;
use std::collections::HashSet;
use std::future::Future;

/// A transaction output: funding txid (lowercase hex) and index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Outpoint {
    pub txid: String,
    pub vout: u32,
}

/// The spend status of an outpoint, as ElectrumX 2.0 writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Height of the funding transaction; `None`: no such output (known).
    pub funder_height: Option<i64>,
    /// The spending transaction and its height.
    pub spender: Option<(String, i64)>,
}

impl Status {
    /// The JSON text, members in ElectrumX 2.0's order.
    pub fn to_json(&self) -> String {
        let Some(funder) = self.funder_height else {
            return "{}".into();
        };
        match &self.spender {
            None => format!("{{\"funder_height\":{funder}}}"),
            Some((txid, height)) => format!(
                "{{\"funder_height\":{funder},\"spender_txhash\":{},\"spender_height\":{height}}}",
                crate::jsonrpc::quote(txid)
            ),
        }
    }

    /// Read a status an upstream answered or notified.
    pub fn parse(text: &str) -> Option<Status> {
        #[derive(serde::Deserialize)]
        struct Raw {
            funder_height: Option<i64>,
            spender_txhash: Option<String>,
            spender_height: Option<i64>,
        }
        let raw: Raw = serde_json::from_str(text).ok()?;
        Some(Status {
            funder_height: raw.funder_height,
            spender: raw
                .spender_txhash
                .map(|t| t.to_ascii_lowercase())
                .zip(raw.spender_height),
        })
    }
}

/// The params of `blockchain.outpoint.subscribe` / `get_status`
/// (`[tx_hash, txout_idx, spk_hint]`, the hint optional) or `unsubscribe`
/// (`[tx_hash, txout_idx]`), checked as ElectrumX checks them.
pub fn params(params: &str) -> Result<(Outpoint, Option<Vec<u8>>), RpcError> {
    let bad = |m: &str| RpcError::new(ErrorCode::BadRequest, m.to_string());
    let args: Vec<Value> = match serde_json::from_str::<Value>(params) {
        Ok(Value::Array(a)) => a,
        Ok(Value::Object(mut named)) => ["tx_hash", "txout_idx", "spk_hint"]
            .iter()
            .map_while(|k| named.remove(*k))
            .collect(),
        _ => return Err(RpcError::new(ErrorCode::InvalidParams, "invalid params")),
    };
    let txid = match args.first() {
        Some(Value::String(t)) if t.len() == 64 && hex::decode(t).is_ok() => t.to_ascii_lowercase(),
        Some(other) => return Err(bad(&format!("{other} should be a transaction hash"))),
        None => {
            return Err(RpcError::new(
                ErrorCode::InvalidParams,
                "expected tx_hash and txout_idx",
            ))
        }
    };
    let vout = match args.get(1) {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(&format!("{n} should be a non-negative integer")))?,
        Some(other) => return Err(bad(&format!("{other} should be a non-negative integer"))),
        None => {
            return Err(RpcError::new(
                ErrorCode::InvalidParams,
                "expected tx_hash and txout_idx",
            ))
        }
    };
    let hint = match args.get(2) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            Some(hex::decode(s).map_err(|_| bad(&format!("{s} should be a hex string")))?)
        }
        Some(other) => return Err(bad(&format!("{other} should be a hex string"))),
    };
    Ok((Outpoint { txid, vout }, hint))
}

/// The script that output `vout` of a raw transaction pays, if it has one.
pub fn output_script(raw_hex: &str, vout: u32) -> Result<Option<Vec<u8>>, RpcError> {
    let tx = tx::parse_hex(raw_hex)
        .map_err(|e| RpcError::new(ErrorCode::InternalError, e.to_string()))?;
    Ok(tx.outputs.get(vout as usize).cloned())
}

/// What [`emulate`] concluded, with the transactions it learned do not
/// spend the outpoint (give them back next time: they are not fetched again).
pub struct Emulated {
    pub status: Status,
    pub not_spenders: HashSet<String>,
}

/// A fetched raw transaction: `Ok(None)` when the upstream says there is no
/// such transaction (its own error), `Err` when the proxy could not ask.
pub type TxFetch = Result<Option<String>, RpcError>;

/// Compute an outpoint's status from the history of the script `spk`
/// (`history`: `(tx_hash, height)` in history order) and the transactions
/// `fetch_tx` returns.
pub async fn emulate<F, Fut>(
    op: &Outpoint,
    spk: &[u8],
    history: Vec<(String, i64)>,
    mut not_spenders: HashSet<String>,
    fetch_tx: F,
) -> Result<Emulated, RpcError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = TxFetch>,
{
    let unknown = |not_spenders| Emulated {
        status: Status::default(),
        not_spenders,
    };
    let Some(funder_height) = history.iter().find(|(t, _)| *t == op.txid).map(|(_, h)| *h) else {
        return Ok(unknown(not_spenders));
    };
    // The history lists transactions that spend from the script too: check
    // that this output pays it.
    let Some(raw) = fetch_tx(op.txid.clone()).await? else {
        return Ok(unknown(not_spenders));
    };
    if output_script(&raw, op.vout)?.as_deref() != Some(spk) {
        return Ok(unknown(not_spenders));
    }
    let mut status = Status {
        funder_height: Some(funder_height),
        spender: None,
    };
    let confirmed = |h: i64| h > 0;
    for (txid, height) in &history {
        // A spender comes after its funder: in a later block, or in the
        // mempool; a mempool funder is spent only from the mempool.
        let possible = *txid != op.txid
            && if confirmed(funder_height) {
                !confirmed(*height) || *height >= funder_height
            } else {
                !confirmed(*height)
            };
        if !possible || not_spenders.contains(txid) {
            continue;
        }
        let Some(raw) = fetch_tx(txid.clone()).await? else {
            continue; // gone meanwhile (replaced in the mempool)
        };
        let spends = match tx::parse_hex(&raw) {
            Ok(tx) => tx
                .inputs
                .iter()
                .any(|(t, i)| *t == op.txid && *i == op.vout),
            Err(e) => {
                tracing::debug!(txid = %txid, error = %e, "outpoint emulation: transaction not read");
                false
            }
        };
        if spends {
            status.spender = Some((txid.clone(), *height));
            break;
        }
        not_spenders.insert(txid.clone());
    }
    Ok(Emulated {
        status,
        not_spenders,
    })
}

/// A `blockchain.scripthash.get_history` result as `(tx_hash, height)`.
pub fn history_pairs(result: &str) -> Result<Vec<(String, i64)>, RpcError> {
    #[derive(serde::Deserialize)]
    struct Item {
        tx_hash: String,
        height: i64,
    }
    let items: Vec<Item> = serde_json::from_str(result)
        .map_err(|_| RpcError::new(ErrorCode::InternalError, "unexpected history from upstream"))?;
    Ok(items
        .into_iter()
        .map(|i| (i.tx_hash.to_ascii_lowercase(), i.height))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shapes_are_electrumx_2_0s() {
        assert_eq!(Status::default().to_json(), "{}");
        let funded = Status {
            funder_height: Some(-1),
            spender: None,
        };
        assert_eq!(funded.to_json(), r#"{"funder_height":-1}"#);
        let spent = Status {
            funder_height: Some(5),
            spender: Some(("ab".repeat(32), 0)),
        };
        let text = spent.to_json();
        assert_eq!(
            text,
            format!(
                r#"{{"funder_height":5,"spender_txhash":"{}","spender_height":0}}"#,
                "ab".repeat(32)
            )
        );
        assert_eq!(Status::parse(&text), Some(spent));
        assert_eq!(Status::parse("{ }"), Some(Status::default()));
        assert_eq!(Status::parse("[]"), None);
    }

    #[test]
    fn params_are_checked() {
        let t = "AB".repeat(32);
        let (op, hint) = params(&format!(r#"["{t}", 3, "76a9"]"#)).unwrap();
        assert_eq!(
            op,
            Outpoint {
                txid: t.to_ascii_lowercase(),
                vout: 3
            }
        );
        assert_eq!(hint, Some(vec![0x76, 0xa9]));
        assert_eq!(params(&format!(r#"["{t}", 0]"#)).unwrap().1, None);
        let named = params(&format!(r#"{{"tx_hash":"{t}","txout_idx":1}}"#)).unwrap();
        assert_eq!(named.0.vout, 1);
        for bad in [
            "[]".to_string(),
            r#"["xx", 0]"#.to_string(),
            format!(r#"["{t}", -1]"#),
            format!(r#"["{t}", "0"]"#),
            format!(r#"["{t}", 0, "zz"]"#),
            format!(r#"["{t}"]"#),
        ] {
            assert!(params(&bad).is_err(), "{bad}");
        }
    }

    /// A raw transaction (hex) spending `inputs` and paying `outputs`.
    fn raw(inputs: &[(&str, u32)], outputs: &[&[u8]]) -> String {
        let mut t = vec![1, 0, 0, 0, inputs.len() as u8];
        for (txid, vout) in inputs {
            let mut id = hex::decode(txid).unwrap();
            id.reverse();
            t.extend(id);
            t.extend(vout.to_le_bytes());
            t.extend([0, 0xff, 0xff, 0xff, 0xff]);
        }
        t.push(outputs.len() as u8);
        for script in outputs {
            t.extend(1000u64.to_le_bytes());
            t.push(script.len() as u8);
            t.extend(*script);
        }
        t.extend([0; 4]);
        hex::encode(t)
    }

    #[tokio::test]
    async fn emulation_finds_the_spender_in_the_scripts_history() {
        let spk: &[u8] = &[0x51];
        let other: &[u8] = &[0x52];
        let prev = "11".repeat(32);
        let fund_raw = raw(&[(&prev, 0)], &[other, spk]);
        // Fetched by name: the name need not be the real txid here.
        let fund = "aa".repeat(32);
        let spend_raw = raw(&[(&fund, 1)], &[other]);
        let spend = "22".repeat(32);
        let unrelated = "33".repeat(32);
        let unrelated_raw = raw(&[(&fund, 0)], &[spk]);
        let txs: std::collections::HashMap<String, String> = [
            (fund.clone(), fund_raw),
            (spend.clone(), spend_raw),
            (unrelated.clone(), unrelated_raw),
        ]
        .into();
        let fetches = std::sync::atomic::AtomicUsize::new(0);
        let fetch = |t: String| {
            fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let found = txs.get(&t).cloned();
            async move { Ok(found) }
        };
        let op = Outpoint {
            txid: fund.clone(),
            vout: 1,
        };
        let run = |history: Vec<(String, i64)>, known: HashSet<String>| {
            emulate(&op, spk, history, known, &fetch)
        };

        // Funded at 10; output 0 being spent does not spend output 1.
        let e = run(
            vec![(fund.clone(), 10), (unrelated.clone(), 0)],
            HashSet::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            e.status,
            Status {
                funder_height: Some(10),
                spender: None
            }
        );
        assert!(e.not_spenders.contains(&unrelated));
        // Spent in a later block; what is known not to spend is not fetched.
        let before = fetches.load(std::sync::atomic::Ordering::Relaxed);
        let history = vec![
            (fund.clone(), 10),
            (unrelated.clone(), 11),
            (spend.clone(), 12),
        ];
        let e = run(history, e.not_spenders).await.unwrap();
        assert_eq!(e.status.spender, Some((spend.clone(), 12)));
        assert_eq!(
            fetches.load(std::sync::atomic::Ordering::Relaxed) - before,
            2
        );
        // A transaction in an earlier block cannot spend it.
        let e = run(vec![(spend.clone(), 9), (fund.clone(), 10)], HashSet::new())
            .await
            .unwrap();
        assert_eq!(e.status.spender, None);
        // Not in the script's history, or output 1 pays another script: `{}`.
        assert_eq!(
            run(vec![], HashSet::new()).await.unwrap().status,
            Status::default()
        );
        let op0 = Outpoint {
            txid: fund.clone(),
            vout: 0,
        };
        let e = emulate(&op0, spk, vec![(fund.clone(), 10)], HashSet::new(), &fetch)
            .await
            .unwrap();
        assert_eq!(e.status, Status::default());
    }
}
