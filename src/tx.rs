//! Reading the inputs and outputs of a raw transaction, for outpoint
//! emulation (see `outpoint`).
//!
//! Owns: a small, bounded parser of Bitcoin-style transactions: the legacy
//! and the segwit serialization, and the layout of proof-of-stake coins
//! (Peercoin and its descendants, such as several of the araguaneybits
//! coins) that carry a 4-byte timestamp after the version. It reads only
//! what outpoint emulation needs: each input's previous outpoint and each
//! output's script. It does not check signatures, amounts or scripts.
//!
//! The layout is not announced in the bytes, so each is tried in turn and
//! the first that consumes the transaction exactly wins; coins that append
//! a payload after the lock time (Dash-style special transactions) are read
//! by the legacy layout with the rest left unread, as a last resort.

/// What outpoint emulation needs from a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tx {
    /// Each input's previous outpoint: txid in display order (hex) and index.
    pub inputs: Vec<(String, u32)>,
    /// Each output's script.
    pub outputs: Vec<Vec<u8>>,
}

/// Why a transaction could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a transaction this proxy can read: {0}")]
pub struct TxError(&'static str);

/// Read a raw transaction (bytes).
pub fn parse(raw: &[u8]) -> Result<Tx, TxError> {
    let mut last = TxError("empty");
    for (timestamp, exact) in [(false, true), (true, true), (false, false)] {
        let mut r = Reader { raw, at: 0 };
        match read(&mut r, timestamp) {
            Ok(tx) if !exact || r.at == raw.len() => return Ok(tx),
            Ok(_) => last = TxError("bytes left over"),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Read a raw transaction given as hex.
pub fn parse_hex(raw_hex: &str) -> Result<Tx, TxError> {
    let raw = hex::decode(raw_hex.trim()).map_err(|_| TxError("not hex"))?;
    parse(&raw)
}

/// Most inputs or outputs believed (a bound against garbage, far above any
/// standard transaction).
const MAX_ITEMS: u64 = 100_000;

struct Reader<'a> {
    raw: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], TxError> {
        let end = self.at.checked_add(n).ok_or(TxError("too long"))?;
        let bytes = self.raw.get(self.at..end).ok_or(TxError("truncated"))?;
        self.at = end;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, TxError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint(&mut self) -> Result<u64, TxError> {
        let first = self.take(1)?[0];
        let wide = |r: &mut Self, n: usize| -> Result<u64, TxError> {
            let b = r.take(n)?;
            Ok(b.iter().rev().fold(0u64, |acc, x| (acc << 8) | *x as u64))
        };
        match first {
            0xfd => wide(self, 2),
            0xfe => wide(self, 4),
            0xff => wide(self, 8),
            n => Ok(n as u64),
        }
    }

    fn count(&mut self) -> Result<usize, TxError> {
        let n = self.varint()?;
        if n > MAX_ITEMS {
            return Err(TxError("implausible count"));
        }
        Ok(n as usize)
    }

    fn bytes(&mut self) -> Result<&[u8], TxError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| TxError("too long"))?;
        self.take(n)
    }
}

fn read(r: &mut Reader<'_>, timestamp: bool) -> Result<Tx, TxError> {
    r.u32()?; // version
    if timestamp {
        r.u32()?;
    }
    // Segwit: a zero input count followed by flag 1.
    let segwit = r.raw.get(r.at..r.at + 2) == Some(&[0, 1]);
    if segwit {
        r.take(2)?;
    }
    let n_in = r.count()?;
    if n_in == 0 {
        return Err(TxError("no inputs"));
    }
    let mut inputs = Vec::with_capacity(n_in.min(1024));
    for _ in 0..n_in {
        let mut txid = r.take(32)?.to_vec();
        txid.reverse();
        let index = r.u32()?;
        r.bytes()?; // scriptSig
        r.u32()?; // sequence
        inputs.push((hex::encode(txid), index));
    }
    let n_out = r.count()?;
    let mut outputs = Vec::with_capacity(n_out.min(1024));
    for _ in 0..n_out {
        r.take(8)?; // value
        outputs.push(r.bytes()?.to_vec());
    }
    if segwit {
        for _ in 0..n_in {
            for _ in 0..r.count()? {
                r.bytes()?;
            }
        }
    }
    r.u32()?; // lock time
    Ok(Tx { inputs, outputs })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transaction with one input spending `prev:index`, one output paying
    /// `script`; optionally segwit (one witness item) or with a timestamp.
    fn build(prev: [u8; 32], index: u32, script: &[u8], segwit: bool, time: bool) -> Vec<u8> {
        let mut t = vec![1, 0, 0, 0];
        if time {
            t.extend([0x5e, 0x10, 0x20, 0x30]);
        }
        if segwit {
            t.extend([0, 1]);
        }
        t.push(1);
        t.extend(prev);
        t.extend(index.to_le_bytes());
        t.extend([2, 0xab, 0xcd]);
        t.extend([0xff; 4]);
        t.push(1);
        t.extend(5000u64.to_le_bytes());
        t.push(script.len() as u8);
        t.extend(script);
        if segwit {
            t.extend([1, 3, 1, 2, 3]);
        }
        t.extend([0; 4]);
        t
    }

    #[test]
    fn reads_every_layout() {
        let mut prev = [0u8; 32];
        prev[0] = 0x11; // the last byte in display order
        let script = hex::decode("76a914000102030405060708090a0b0c0d0e0f1011121388ac").unwrap();
        let display = format!("{}11", "00".repeat(31));
        for (segwit, time) in [(false, false), (true, false), (false, true), (true, true)] {
            let tx = parse(&build(prev, 7, &script, segwit, time)).unwrap();
            assert_eq!(tx.inputs, vec![(display.clone(), 7)], "{segwit} {time}");
            assert_eq!(tx.outputs, vec![script.clone()]);
        }
        // A payload after the lock time is tolerated as a last resort.
        let mut extra = build(prev, 1, &script, false, false);
        extra.extend([3, 9, 9, 9]);
        assert_eq!(parse(&extra).unwrap().inputs[0].1, 1);
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in [&b""[..], &[1, 0, 0, 0][..], &[1, 0, 0, 0, 0xff, 0xff][..]] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse_hex("zz").is_err());
        // A count far beyond the bytes is refused without allocating it.
        let mut huge = vec![1, 0, 0, 0, 0xfe];
        huge.extend(u32::MAX.to_le_bytes());
        assert!(parse(&huge).is_err());
    }
}
