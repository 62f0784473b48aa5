//! The chain both the mock and the load generator know (deterministic).

use super::*;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

pub(crate) struct Data {
    pub(crate) scripthashes: Vec<String>,
    pub(crate) txids: Vec<String>,
    /// Result text by first param (scripthash or txid).
    pub(crate) histories: HashMap<String, String>,
    pub(crate) balances: HashMap<String, String>,
    pub(crate) unspents: HashMap<String, String>,
    pub(crate) txs: HashMap<String, (usize, String)>,
    /// Quoted header hex by height.
    pub(crate) headers: Vec<String>,
}

pub(crate) fn hash_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Data {
    pub(crate) fn new() -> Data {
        let scripthashes: Vec<String> = (0..SCRIPTHASHES)
            .map(|i| hash_hex(&format!("script-{i}")))
            .collect();
        let txids: Vec<String> = (0..TXIDS).map(|i| hash_hex(&format!("tx-{i}"))).collect();
        let mut histories = HashMap::new();
        let mut balances = HashMap::new();
        let mut unspents = HashMap::new();
        for (i, sh) in scripthashes.iter().enumerate() {
            let n = 1 + i % 4;
            let items: Vec<(usize, usize)> = (0..n)
                .map(|k| ((i * 3 + k) % TXIDS, 10 + (i * 7 + k * 13) % (BLOCKS - 20)))
                .collect();
            let history: Vec<String> = items
                .iter()
                .map(|(t, h)| format!("{{\"tx_hash\":\"{}\",\"height\":{h}}}", txids[*t]))
                .collect();
            histories.insert(sh.clone(), format!("[{}]", history.join(",")));
            balances.insert(
                sh.clone(),
                format!("{{\"confirmed\":{},\"unconfirmed\":0}}", n * 100_000),
            );
            let utxos: Vec<String> = items
                .iter()
                .map(|(t, h)| {
                    format!(
                        "{{\"tx_hash\":\"{}\",\"tx_pos\":0,\"height\":{h},\"value\":100000}}",
                        txids[*t]
                    )
                })
                .collect();
            unspents.insert(sh.clone(), format!("[{}]", utxos.join(",")));
        }
        let txs = txids
            .iter()
            .enumerate()
            .map(|(i, t)| {
                // 200 to 500 bytes, like most wallet transactions.
                let len = 200 + (i * 37) % 300;
                let mut raw = String::with_capacity(2 * len + 2);
                raw.push('"');
                while raw.len() < 2 * len + 1 {
                    raw.push_str(&hash_hex(&format!("{t}-{}", raw.len())));
                }
                raw.truncate(2 * len + 1);
                raw.push('"');
                (t.clone(), (i, raw))
            })
            .collect();
        let headers = (0..BLOCKS)
            .map(|h| {
                let a = hash_hex(&format!("header-{h}"));
                let b = hash_hex(&format!("header-{h}-b"));
                format!("\"{a}{b}{}\"", &a[..32])
            })
            .collect();
        Data {
            scripthashes,
            txids,
            histories,
            balances,
            unspents,
            txs,
            headers,
        }
    }

    pub(crate) fn tip(&self) -> usize {
        BLOCKS - 1
    }
}
