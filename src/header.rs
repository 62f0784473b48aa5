//! Block headers in the forms different Electrum clients read.
//!
//! Owns: decoding an 80-byte Bitcoin-style header and writing the reply forms
//! of `blockchain.headers.subscribe`: modern (`hex`, `height`), the pre-1.3
//! "deserialized" object, the hybrid of both for sessions that never
//! negotiated, and the bare height of `blockchain.numblocks.subscribe`.

use serde_json::json;

/// Which shape of header a subscriber wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderForm {
    /// `{"hex": ..., "height": ...}` (protocol 1.3 and later, and 1.2 with `raw`).
    Modern,
    /// `{"block_height": ..., "version": ..., ...}` (protocol 1.2 and earlier).
    Deserialized,
    /// Both sets of members in one object, for sessions that never negotiated.
    Hybrid,
    /// The height alone (`blockchain.numblocks.subscribe`).
    Height,
}

/// A decoded 80-byte header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub prev_block_hash: String,
    pub merkle_root: String,
    pub timestamp: u32,
    pub bits: u32,
    pub nonce: u32,
}

/// Decode a header's hex. Hashes come out in the usual display order
/// (byte-reversed).
pub fn decode(hex_header: &str) -> Result<Header, String> {
    let bytes = hex::decode(hex_header).map_err(|_| "header is not hex".to_string())?;
    if bytes.len() != 80 {
        return Err(format!(
            "cannot deserialize a {}-byte header: this coin's headers are not 80-byte Bitcoin-style headers",
            bytes.len()
        ));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let hash_at = |i: usize| {
        let mut h = bytes[i..i + 32].to_vec();
        h.reverse();
        hex::encode(h)
    };
    Ok(Header {
        version: u32_at(0),
        prev_block_hash: hash_at(4),
        merkle_root: hash_at(36),
        timestamp: u32_at(68),
        bits: u32_at(72),
        nonce: u32_at(76),
    })
}

/// The JSON of a header at `height` in `form`. Fails only for forms that
/// need decoding when the header is not 80 bytes.
pub fn render(form: HeaderForm, height: u64, hex_header: &str) -> Result<String, String> {
    let value = match form {
        HeaderForm::Modern => return Ok(modern(height, hex_header)),
        HeaderForm::Height => return Ok(height.to_string()),
        HeaderForm::Deserialized => {
            let h = decode(hex_header)?;
            json!({
                "block_height": height,
                "version": h.version,
                "prev_block_hash": h.prev_block_hash,
                "merkle_root": h.merkle_root,
                "timestamp": h.timestamp,
                "bits": h.bits,
                "nonce": h.nonce,
            })
        }
        HeaderForm::Hybrid => match decode(hex_header) {
            Ok(h) => json!({
                "hex": hex_header,
                "height": height,
                "block_height": height,
                "version": h.version,
                "prev_block_hash": h.prev_block_hash,
                "merkle_root": h.merkle_root,
                "timestamp": h.timestamp,
                "bits": h.bits,
                "nonce": h.nonce,
            }),
            // A modern client can still read this; a legacy one could not
            // have read any form of a non-80-byte header.
            Err(_) => return Ok(modern(height, hex_header)),
        },
    };
    Ok(value.to_string())
}

/// The modern form, in ElectrumX's member order.
pub fn modern(height: u64, hex_header: &str) -> String {
    format!(
        "{{\"hex\":{},\"height\":{}}}",
        crate::jsonrpc::quote(hex_header),
        height
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bitcoin's genesis block header.
    const GENESIS: &str = "0100000000000000000000000000000000000000000000000000000000000000000000003ba3edfd7a7b12b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4a29ab5f49ffff001d1dac2b7c";

    #[test]
    fn decodes_the_genesis_header() {
        let h = decode(GENESIS).unwrap();
        assert_eq!(h.version, 1);
        assert_eq!(h.prev_block_hash, "0".repeat(64));
        assert_eq!(
            h.merkle_root,
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b"
        );
        assert_eq!(h.timestamp, 1231006505);
        assert_eq!(h.bits, 486604799);
        assert_eq!(h.nonce, 2083236893);
    }

    #[test]
    fn wrong_length_is_a_clear_error() {
        let e = decode(&"00".repeat(112)).unwrap_err();
        assert!(e.contains("112-byte header"), "{e}");
        assert!(decode("zz").is_err());
    }

    #[test]
    fn forms() {
        assert_eq!(
            render(HeaderForm::Modern, 0, GENESIS).unwrap(),
            format!("{{\"hex\":\"{GENESIS}\",\"height\":0}}")
        );
        assert_eq!(render(HeaderForm::Height, 7, GENESIS).unwrap(), "7");
        let d: serde_json::Value =
            serde_json::from_str(&render(HeaderForm::Deserialized, 0, GENESIS).unwrap()).unwrap();
        assert_eq!(d["block_height"], 0);
        assert_eq!(d["nonce"], 2083236893u32);
        assert!(d.get("hex").is_none());
        let h: serde_json::Value =
            serde_json::from_str(&render(HeaderForm::Hybrid, 0, GENESIS).unwrap()).unwrap();
        assert_eq!(h["hex"], GENESIS);
        assert_eq!(h["height"], 0);
        assert_eq!(h["timestamp"], 1231006505);
        assert!(render(HeaderForm::Deserialized, 0, &"00".repeat(81)).is_err());
        assert!(render(HeaderForm::Hybrid, 0, &"00".repeat(81))
            .unwrap()
            .contains("\"hex\""));
    }
}
