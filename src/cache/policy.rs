//! Which forwarded requests may be served from memory, and for how long.
//!
//! Owns: [`policy`] (method and params to a [`Policy`], read in place where
//! the params have their usual shape); the cache (`super`) applies it.

use serde_json::value::RawValue;

/// How a request may be served from memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Immutable whatever the chain does (a raw transaction).
    Forever,
    /// Immutable once this height is `reorg_margin` blocks deep.
    Height(u64),
    /// Kept for the fee TTL.
    Fees,
}

/// The policy of a forwarded request; `None`: never cached nor coalesced.
pub fn policy(method: &str, params: &str) -> Option<Policy> {
    match method {
        "blockchain.transaction.get" => {
            if lone_string(params) {
                return Some(Policy::Forever);
            }
            let args = args(params)?;
            let verbose = match args.as_slice() {
                [_] => false,
                [_, v] => v.get() != "false",
                _ => return None,
            };
            (!verbose && args[0].get().starts_with('"')).then_some(Policy::Forever)
        }
        "blockchain.block.header" => {
            // [height] or [height, cp_height]
            if let Some(h) = lone_uint(params) {
                return Some(Policy::Height(h));
            }
            let args = args(params)?;
            match args.as_slice() {
                [h] => Some(Policy::Height(uint(h)?)),
                [h, cp] => Some(Policy::Height(uint(h)?.max(uint(cp)?))),
                _ => None,
            }
        }
        "blockchain.block.headers" => {
            // [start, count] or [start, count, cp_height]
            let args = args(params)?;
            let (start, count, cp) = match args.as_slice() {
                [s, c] => (uint(s)?, uint(c)?, 0),
                [s, c, cp] => (uint(s)?, uint(c)?, uint(cp)?),
                _ => return None,
            };
            let last = start.checked_add(count.max(1) - 1)?;
            Some(Policy::Height(last.max(cp)))
        }
        "blockchain.transaction.get_merkle" => {
            // [txid, height]
            match args(params)?.as_slice() {
                [_, h] => Some(Policy::Height(uint(h)?)),
                _ => None,
            }
        }
        "blockchain.transaction.id_from_pos" => {
            // [height, tx_pos] or [height, tx_pos, merkle]
            match args(params)?.as_slice() {
                [h, _] | [h, _, _] => Some(Policy::Height(uint(h)?)),
                _ => None,
            }
        }
        "blockchain.estimatefee"
        | "blockchain.relayfee"
        | "mempool.get_fee_histogram"
        | "mempool.recent" => Some(Policy::Fees),
        _ => None,
    }
}

/// `["..."]`, read in place: the usual form of a lone txid argument.
fn lone_string(params: &str) -> bool {
    let p = params.trim();
    p.len() >= 4
        && p.starts_with("[\"")
        && p.ends_with("\"]")
        && !p[2..p.len() - 2].contains(['"', '\\'])
}

/// `[N]`, read in place.
fn lone_uint(params: &str) -> Option<u64> {
    let inner = params.trim().strip_prefix('[')?.strip_suffix(']')?.trim();
    if inner.bytes().all(|b| b.is_ascii_digit()) {
        inner.parse().ok()
    } else {
        None
    }
}

/// Positional params; named params (an object) are not cached.
fn args(params: &str) -> Option<Vec<&RawValue>> {
    serde_json::from_str(params).ok()
}

/// A JSON number that is a non-negative integer.
fn uint(v: &RawValue) -> Option<u64> {
    v.get().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        let tx = "\"ab\"";
        assert_eq!(
            policy("blockchain.transaction.get", &format!("[{tx}]")),
            Some(Policy::Forever)
        );
        assert_eq!(
            policy("blockchain.transaction.get", &format!("[{tx}, false]")),
            Some(Policy::Forever)
        );
        assert_eq!(
            policy("blockchain.transaction.get", &format!("[{tx}, true]")),
            None
        );
        assert_eq!(
            policy("blockchain.block.header", "[10]"),
            Some(Policy::Height(10))
        );
        assert_eq!(
            policy("blockchain.block.header", "[10, 20]"),
            Some(Policy::Height(20))
        );
        assert_eq!(
            policy("blockchain.block.headers", "[100, 2016]"),
            Some(Policy::Height(2115))
        );
        assert_eq!(
            policy("blockchain.block.headers", "[100, 10, 50]"),
            Some(Policy::Height(109))
        );
        assert_eq!(
            policy("blockchain.transaction.get_merkle", "[\"ab\", 7]"),
            Some(Policy::Height(7))
        );
        assert_eq!(
            policy("blockchain.transaction.id_from_pos", "[7, 1, true]"),
            Some(Policy::Height(7))
        );
        assert_eq!(policy("blockchain.relayfee", "[]"), Some(Policy::Fees));
        assert_eq!(
            policy("blockchain.block.header", " [ 12 ] "),
            Some(Policy::Height(12))
        );
        assert_eq!(
            policy("blockchain.transaction.get", " [ \"ab\" ] "),
            Some(Policy::Forever)
        );
        assert_eq!(policy("blockchain.transaction.get", "[\"ab\",true]"), None);
        assert_eq!(
            policy("blockchain.transaction.get", "[\"a\\\"b\"]"),
            Some(Policy::Forever)
        );
        for (m, p) in [
            ("blockchain.scripthash.get_history", "[\"ab\"]"),
            ("blockchain.scripthash.get_balance", "[\"ab\"]"),
            ("blockchain.scripthash.listunspent", "[\"ab\"]"),
            ("blockchain.transaction.broadcast", "[\"00\"]"),
            ("blockchain.headers.subscribe", "[]"),
            ("blockchain.block.header", "[\"10\"]"),
            ("blockchain.block.header", "[-1]"),
            ("blockchain.block.header", "{\"height\":10}"),
            ("blockchain.block.headers", "[18446744073709551615, 2]"),
        ] {
            assert_eq!(policy(m, p), None, "{m} {p}");
        }
    }
}
