//! Coin parameters and legacy address decoding.
//!
//! Owns: the base58check version bytes of each coin (built in for the
//! araguaneybits coins and two well-known examples, overridable per coin in
//! the config) and turning an address into the scripthash that the modern
//! `blockchain.scripthash.*` methods take. Nothing else about coins lives here.

use sha2::{Digest, Sha256};

/// Address version bytes of one coin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressVersions {
    pub p2pkh: u8,
    pub p2sh: u8,
}

/// Built-in version bytes, by coin table name (case-insensitive).
pub fn builtin_versions(name: &str) -> Option<AddressVersions> {
    let v = |p2pkh, p2sh| Some(AddressVersions { p2pkh, p2sh });
    match name.to_ascii_lowercase().as_str() {
        // From the coins' own wallet and server parameters.
        "onixcoin" | "onix" => v(0x4b, 0x05),
        "bolivarcoin" | "boli" => v(0x55, 0x05),
        "arepacoin" | "arepa" => v(0x17, 0x55),
        "lkrcoin" | "lkr" => v(0x30, 0x55),
        "bitcoin" | "btc" => v(0x00, 0x05),
        "litecoin" | "ltc" => v(0x30, 0x32),
        _ => None,
    }
}

/// Why an address was refused; the text is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("invalid address {0}: not a base58check string")]
    NotBase58(String),
    #[error("invalid address {0}: wrong length")]
    Length(String),
    #[error("invalid address {address}: version byte {version} is not this coin's (P2PKH {p2pkh}, P2SH {p2sh})")]
    WrongVersion {
        address: String,
        version: u8,
        p2pkh: u8,
        p2sh: u8,
    },
    #[error("address methods are not available: this coin has no address version bytes configured (set p2pkh_version and p2sh_version)")]
    NoVersions,
}

/// The output script an address pays to.
pub fn address_script(address: &str, versions: AddressVersions) -> Result<Vec<u8>, AddressError> {
    let payload = bs58::decode(address)
        .with_check(None)
        .into_vec()
        .map_err(|_| AddressError::NotBase58(address.to_string()))?;
    if payload.len() != 21 {
        return Err(AddressError::Length(address.to_string()));
    }
    let (version, hash160) = (payload[0], &payload[1..]);
    let mut script = Vec::with_capacity(25);
    if version == versions.p2pkh {
        // OP_DUP OP_HASH160 <20> ... OP_EQUALVERIFY OP_CHECKSIG
        script.extend_from_slice(&[0x76, 0xa9, 0x14]);
        script.extend_from_slice(hash160);
        script.extend_from_slice(&[0x88, 0xac]);
    } else if version == versions.p2sh {
        // OP_HASH160 <20> ... OP_EQUAL
        script.extend_from_slice(&[0xa9, 0x14]);
        script.extend_from_slice(hash160);
        script.push(0x87);
    } else {
        return Err(AddressError::WrongVersion {
            address: address.to_string(),
            version,
            p2pkh: versions.p2pkh,
            p2sh: versions.p2sh,
        });
    }
    Ok(script)
}

/// The Electrum scripthash of a script: sha256, byte-reversed, hex.
pub fn script_hash(script: &[u8]) -> String {
    let mut digest = Sha256::digest(script).to_vec();
    digest.reverse();
    hex::encode(digest)
}

/// The scripthash of an address.
pub fn address_to_scripthash(
    address: &str,
    versions: Option<AddressVersions>,
) -> Result<String, AddressError> {
    let versions = versions.ok_or(AddressError::NoVersions)?;
    Ok(script_hash(&address_script(address, versions)?))
}

/// Whether `s` looks like a scripthash (64 hex digits).
pub fn is_scripthash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(coin: &str) -> AddressVersions {
        builtin_versions(coin).unwrap()
    }

    /// The seed document's telnet examples are the test vectors.
    #[test]
    fn seed_addresses_decode_with_their_coins_version_bytes() {
        let cases = [
            ("arepacoin", "AJrdoamrqi5GBy1hafCbdB1JfioUfQvtxH", 0x17),
            ("onixcoin", "XTo7XEAgPapkgJkgH6iR31J4cHBxwTgREe", 0x4b),
            ("lkrcoin", "LfJ6WnZiYYRKLzhj1FtPXyzzh7hVKC6YyV", 0x30),
        ];
        for (coin, addr, version) in cases {
            let payload = bs58::decode(addr).with_check(None).into_vec().unwrap();
            assert_eq!(payload[0], version, "{addr}");
            let script = address_script(addr, versions(coin)).unwrap();
            assert_eq!(&script[..3], &[0x76, 0xa9, 0x14]);
            assert_eq!(&script[3..23], &payload[1..]);
            let sh = address_to_scripthash(addr, Some(versions(coin))).unwrap();
            assert!(is_scripthash(&sh));
            // Recompute independently: sha256 of the script, reversed.
            let mut d = Sha256::digest(&script).to_vec();
            d.reverse();
            assert_eq!(sh, hex::encode(d));
        }
    }

    #[test]
    fn known_bitcoin_vector() {
        // The genesis coinbase address and its well-known scripthash.
        let sh = address_to_scripthash(
            "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa",
            Some(versions("bitcoin")),
        )
        .unwrap();
        assert_eq!(
            sh,
            "8b01df4e368ea28f8dc0423bcf7a4923e3a12d307c875e47a0cfbf90b5c39161"
        );
    }

    #[test]
    fn p2sh_address() {
        // A Bitcoin P2SH address: version 5 -> OP_HASH160 .. OP_EQUAL.
        let script =
            address_script("3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy", versions("bitcoin")).unwrap();
        assert_eq!(script.len(), 23);
        assert_eq!(script[0], 0xa9);
        assert_eq!(script[22], 0x87);
    }

    #[test]
    fn wrong_coin_and_garbage_are_refused_with_reasons() {
        // An Onixcoin address is not an Arepacoin one.
        let e = address_to_scripthash(
            "XTo7XEAgPapkgJkgH6iR31J4cHBxwTgREe",
            Some(versions("arepacoin")),
        )
        .unwrap_err();
        assert!(matches!(
            e,
            AddressError::WrongVersion { version: 0x4b, .. }
        ));
        assert!(e.to_string().contains("version byte 75 is not this coin's"));
        // A flipped character breaks the checksum.
        let e = address_to_scripthash(
            "XTo7XEAgPapkgJkgH6iR31J4cHBxwTgREf",
            Some(versions("onixcoin")),
        )
        .unwrap_err();
        assert!(matches!(e, AddressError::NotBase58(_)));
        assert!(address_to_scripthash("0OIl", Some(versions("onixcoin"))).is_err());
        assert_eq!(
            address_to_scripthash("x", None).unwrap_err(),
            AddressError::NoVersions
        );
    }
}
