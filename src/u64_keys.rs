//! The hasher of maps keyed by numbers the proxy makes itself: a
//! connection's request ids, flight numbers, keys already hashed with a
//! keyed hasher. None is chosen by a client, so no keyed hash is needed;
//! one multiply spreads sequential numbers over the whole word (a hash
//! table looks at its top bits too) and leaves hashes as random as they
//! were.

use std::hash::{BuildHasherDefault, Hasher};

/// `HashMap<u64, V, U64Keys>`.
pub type U64Keys = BuildHasherDefault<Mix>;

#[derive(Default)]
pub struct Mix(u64);

const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for Mix {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; anything else still hashes.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(SPREAD);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(SPREAD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn sequential_numbers_spread_over_the_top_bits() {
        let keys = U64Keys::default();
        let tops: std::collections::HashSet<u64> =
            (0..256u64).map(|n| keys.hash_one(n) >> 57).collect();
        // 256 consecutive ids fall in most of the 128 top-7-bit groups.
        assert!(tops.len() > 100, "{}", tops.len());
    }
}
