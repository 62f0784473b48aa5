//! Byte scans on the hot path, sixteen bytes at a time with SSE2 (part of
//! every x86-64 CPU; eight bytes at a time, or one, elsewhere): where a
//! JSON string's next quote, backslash or control character is (the JSON
//! check, `jsonrpc::valid`), and whether a scripthash is 64 lowercase hex
//! digits (`router`). `safe_arch` wraps the SSE2 instructions in safe
//! functions: the crate forbids `unsafe`.

/// The first byte at or after `from` that needs a look in a JSON string
/// (`"`, `\\` or a control character), or `b.len()`.
pub fn string_special(b: &[u8], from: usize) -> usize {
    let mut i = from;
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    while let Some(chunk) = b.get(i..i + 16) {
        let marks = sse2::specials(chunk.try_into().expect("sixteen bytes"));
        if marks != 0 {
            return i + marks.trailing_zeros() as usize;
        }
        i += 16;
    }
    while let Some(chunk) = b.get(i..i + 8) {
        let marks = special_marks(u64::from_le_bytes(chunk.try_into().expect("eight bytes")));
        if marks != 0 {
            return i + marks.trailing_zeros() as usize / 8;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c < 0x20 || c == b'"' || c == b'\\' {
            return i;
        }
        i += 1;
    }
    i
}

/// Whether every byte is a lowercase hexadecimal digit.
pub fn all_lower_hex(mut b: &[u8]) -> bool {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    while let Some((chunk, rest)) = b.split_first_chunk::<16>() {
        if !sse2::all_lower_hex(chunk) {
            return false;
        }
        b = rest;
    }
    b.iter().all(|&c| LOWER_HEX[c as usize])
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The bytes of `w` that need a look, `"`, `\\` or a control character,
/// each marked by its high bit: a zero-byte test of `w ^ '"'` and of
/// `w ^ '\\'`, and a below-0x20 test of `w`. Higher marks may be false
/// (a borrow carries upward), the lowest one never is: no borrow comes
/// from the bytes below it, which are all plain.
fn special_marks(w: u64) -> u64 {
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    let zero_in_quote = quote.wrapping_sub(ONES) & !quote;
    let zero_in_backslash = backslash.wrapping_sub(ONES) & !backslash;
    // A byte >= 0x80 (part of a UTF-8 character) is never marked: `!w`.
    let below_space = w.wrapping_sub(ONES * 0x20) & !w;
    (zero_in_quote | zero_in_backslash | below_space) & HIGHS
}

/// Which bytes are lowercase hexadecimal digits.
static LOWER_HEX: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = matches!(b as u8, b'0'..=b'9' | b'a'..=b'f');
        b += 1;
    }
    t
};

/// Sixteen bytes at once; every mark exact, one bit per byte (bit `k` for
/// byte `k`).
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
mod sse2 {
    use safe_arch::{
        bitor_m128i, cmp_eq_mask_i8_m128i, load_unaligned_m128i, m128i, min_u8_m128i,
        move_mask_i8_m128i, set_splat_i8_m128i, sub_i8_m128i,
    };

    /// The bytes equal to `"` or `\\`, or at most 0x1f.
    pub fn specials(chunk: &[u8; 16]) -> u32 {
        let v = load_unaligned_m128i(chunk);
        let quote = cmp_eq_mask_i8_m128i(v, splat(b'"'));
        let backslash = cmp_eq_mask_i8_m128i(v, splat(b'\\'));
        marks(bitor_m128i(
            bitor_m128i(quote, backslash),
            within(v, 0, 0x1f),
        ))
    }

    /// Whether all sixteen are `0-9` or `a-f`.
    pub fn all_lower_hex(chunk: &[u8; 16]) -> bool {
        let v = load_unaligned_m128i(chunk);
        marks(bitor_m128i(within(v, b'0', 9), within(v, b'a', 5))) == 0xffff
    }

    /// The bytes in `lo..=lo + span` (unsigned): `x - lo`, wrapping, is at
    /// most `span`, that is the minimum of it and `span` is itself.
    fn within(v: m128i, lo: u8, span: u8) -> m128i {
        let off = sub_i8_m128i(v, splat(lo));
        cmp_eq_mask_i8_m128i(min_u8_m128i(off, splat(span)), off)
    }

    fn splat(byte: u8) -> m128i {
        set_splat_i8_m128i(byte as i8)
    }

    /// Sixteen sign bits in the low half: never negative.
    fn marks(v: m128i) -> u32 {
        move_mask_i8_m128i(v) as u32
    }
}

/// Texts for the tests of the string scan and of its callers: for every
/// plain byte kind (ASCII, DEL and the bytes of UTF-8 characters, >= 0x80,
/// which a signed compare would take for control characters) and every
/// length of a plain run on both sides of the 16- and 8-byte steps and of
/// the tail, the run alone (`clean`) and the run followed by each special
/// byte and more plain bytes.
#[cfg(test)]
pub(crate) struct SpecialCase {
    pub(crate) clean: String,
    /// The text, where its special byte is, and that byte.
    pub(crate) specials: Vec<(String, usize, &'static str)>,
}

#[cfg(test)]
pub(crate) fn special_cases() -> Vec<SpecialCase> {
    let mut cases = Vec::new();
    for plain in ["a", "\u{7f}", "é", "日"] {
        for place in 0..48 {
            let clean = plain.repeat(place);
            let specials = ["\"", "\\", "\u{0}", "\n", "\u{1f}"]
                .into_iter()
                .map(|look| {
                    (
                        format!("{clean}{look}{}", plain.repeat(20)),
                        clean.len(),
                        look,
                    )
                })
                .collect();
            cases.push(SpecialCase { clean, specials });
        }
    }
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_special_byte_is_found_at_every_place() {
        for case in special_cases() {
            for (text, at, look) in case.specials {
                assert_eq!(string_special(text.as_bytes(), 0), at, "{text:?}");
                // A later one is found from past the first one.
                let doubled = format!("{text}{look}");
                assert_eq!(string_special(doubled.as_bytes(), at + 1), text.len());
            }
            let text = case.clean;
            assert_eq!(string_special(text.as_bytes(), 0), text.len());
        }
    }

    #[test]
    fn lower_hex_is_told_by_every_byte_at_every_place() {
        let hex = b"0123456789abcdef".repeat(4);
        assert!(all_lower_hex(&hex));
        for place in 0..hex.len() {
            for byte in 0..=255u8 {
                let mut text = hex.clone();
                text[place] = byte;
                let expected = byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte);
                assert_eq!(all_lower_hex(&text), expected, "{byte:#x} at {place}");
                // Shorter than a chunk, and a chunk and a tail.
                assert_eq!(all_lower_hex(&text[place..]), expected);
            }
        }
    }
}
