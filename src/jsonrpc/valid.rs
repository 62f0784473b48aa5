//! A fast check that a text is exactly one JSON value.
//!
//! Every upstream answer is checked before it is relayed (a client never
//! gets invalid JSON from the proxy). serde_json's check (deserializing a
//! `RawValue`) was the largest single cost of relaying an answer. This one
//! scans strings sixteen bytes at a time (`crate::scan`) and builds
//! nothing.
//!
//! It is sound, not complete: `true` means the text is one valid JSON value
//! (RFC 8259; the text is already known to be UTF-8), with no whitespace
//! around it. `false` means it is not, or that it is unusual enough (nested
//! deeper than [`MAX_DEPTH`], an escaped surrogate) that the caller should
//! let serde_json decide. `tests/fuzz.rs` checks it against serde_json.

use std::ops::Range;

/// Containers nested deeper than this are left to serde_json.
pub const MAX_DEPTH: usize = 64;

/// Whether `text` is exactly one JSON value, without surrounding whitespace.
pub fn is_one_value(text: &str) -> bool {
    let b = text.as_bytes();
    let mut at = 0;
    value(b, &mut at, 0) && at == b.len()
}

fn skip_ws(b: &[u8], at: &mut usize) {
    while let Some(c) = b.get(*at) {
        if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            break;
        }
        *at += 1;
    }
}

/// One value starting at `*at` (no leading whitespace); `*at` ends after it.
fn value(b: &[u8], at: &mut usize, depth: usize) -> bool {
    match b.get(*at) {
        Some(b'"') => string(b, at),
        Some(b'{') => object(b, at, depth + 1),
        Some(b'[') => array(b, at, depth + 1),
        Some(b't') => literal(b, at, b"true"),
        Some(b'f') => literal(b, at, b"false"),
        Some(b'n') => literal(b, at, b"null"),
        Some(b'-' | b'0'..=b'9') => number(b, at),
        _ => false,
    }
}

fn literal(b: &[u8], at: &mut usize, word: &[u8]) -> bool {
    if b[*at..].starts_with(word) {
        *at += word.len();
        true
    } else {
        false
    }
}

fn object(b: &[u8], at: &mut usize, depth: usize) -> bool {
    members(b, at, depth, |_, _| true)
}

/// The members of the object whose `{` is at `*at`, each handed to
/// `member` as the ranges of its key (between the quotes) and its value;
/// `*at` ends after the `}`. `false` when it is not an object or `member`
/// says `false`.
fn members(
    b: &[u8],
    at: &mut usize,
    depth: usize,
    mut member: impl FnMut(Range<usize>, Range<usize>) -> bool,
) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    *at += 1;
    skip_ws(b, at);
    if b.get(*at) == Some(&b'}') {
        *at += 1;
        return true;
    }
    loop {
        if b.get(*at) != Some(&b'"') {
            return false;
        }
        let key_start = *at + 1;
        if !string(b, at) {
            return false;
        }
        let key = key_start..*at - 1;
        skip_ws(b, at);
        if b.get(*at) != Some(&b':') {
            return false;
        }
        *at += 1;
        skip_ws(b, at);
        let value_start = *at;
        if !value(b, at, depth) || !member(key, value_start..*at) {
            return false;
        }
        match separator(b, at, b'}') {
            Some(true) => return true,
            Some(false) => {}
            None => return false,
        }
    }
}

fn array(b: &[u8], at: &mut usize, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    *at += 1;
    skip_ws(b, at);
    if b.get(*at) == Some(&b']') {
        *at += 1;
        return true;
    }
    loop {
        if !value(b, at, depth) {
            return false;
        }
        match separator(b, at, b']') {
            Some(true) => return true,
            Some(false) => {}
            None => return false,
        }
    }
}

/// After a member or an element: `,` and what follows it (`Some(false)`:
/// another comes), the closing `close` (`Some(true)`), or neither (`None`).
fn separator(b: &[u8], at: &mut usize, close: u8) -> Option<bool> {
    skip_ws(b, at);
    match b.get(*at) {
        Some(b',') => {
            *at += 1;
            skip_ws(b, at);
            Some(false)
        }
        Some(&c) if c == close => {
            *at += 1;
            Some(true)
        }
        _ => None,
    }
}

/// Call `member(key, value)` for each member of the object `text` is
/// (starting with `{` at once; whitespace allowed between tokens and at
/// the end), in order, with keys as written between their quotes and
/// values checked as [`is_one_value`] checks. `false` when `text` is not
/// such an object, when a key has an escape (its text is not its name),
/// or when `member` says `false`: the caller then asks serde_json.
pub fn each_member<'a>(text: &'a str, mut member: impl FnMut(&'a str, &'a str) -> bool) -> bool {
    let b = text.as_bytes();
    if b.first() != Some(&b'{') {
        return false;
    }
    let mut at = 0;
    let complete = members(b, &mut at, 1, |key, value| {
        // Every bound is next to an ASCII byte: a character boundary.
        match (text.get(key), text.get(value)) {
            (Some(key), Some(value)) => needs_no_escape(key) && member(key, value),
            _ => false,
        }
    });
    skip_ws(b, &mut at);
    complete && at == b.len()
}

/// Whether `text` can stand between quotes as it is: no `"`, `\\` or
/// control character.
pub fn needs_no_escape(text: &str) -> bool {
    crate::scan::string_special(text.as_bytes(), 0) == text.len()
}

/// A string starting at `*at` (its opening quote).
fn string(b: &[u8], at: &mut usize) -> bool {
    let mut i = *at + 1;
    loop {
        i = crate::scan::string_special(b, i);
        match b.get(i) {
            None => return false,
            Some(b'"') => {
                *at = i + 1;
                return true;
            }
            Some(b'\\') => {
                i += 1;
                match b.get(i) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 1,
                    Some(b'u') => {
                        let Some(hex) = b.get(i + 1..i + 5) else {
                            return false;
                        };
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return false;
                        }
                        // Surrogates (paired or not): serde_json decides.
                        if matches!(hex[0], b'd' | b'D')
                            && matches!(hex[1], b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
                        {
                            return false;
                        }
                        i += 5;
                    }
                    _ => return false,
                }
            }
            Some(&c) if c < 0x20 => return false,
            Some(_) => i += 1,
        }
    }
}

/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
fn number(b: &[u8], at: &mut usize) -> bool {
    let mut i = *at;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(b, i),
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        let end = digits(b, i + 1);
        if end == i + 1 {
            return false;
        }
        i = end;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = digits(b, i);
        if end == i {
            return false;
        }
        i = end;
    }
    *at = i;
    true
}

/// Where the run of digits starting at `i` ends.
fn digits(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_told_by_their_special_bytes_at_every_place() {
        // Where the scan finds them: `scan`'s own tests.
        for case in crate::scan::special_cases() {
            for (text, _, _) in &case.specials {
                assert!(!needs_no_escape(text));
            }
            let text = case.clean;
            assert!(needs_no_escape(&text));
            let quoted = format!("\"{text}\"");
            assert!(is_one_value(&quoted), "{quoted:?}");
            let raw_newline = format!("\"{text}\n{text}\"");
            assert!(!is_one_value(&raw_newline));
        }
    }

    #[test]
    fn valid_values_pass() {
        for text in [
            "0",
            "-0",
            "12.5e+3",
            "1E9",
            "-0.001",
            "true",
            "false",
            "null",
            "\"\"",
            "\"a\\\"b\\\\c\\/\\b\\f\\n\\r\\t\\u00e9 é 日本\"",
            "[]",
            "{}",
            "[ 1 , \"x\" , { \"k\" : [ null ] } ]",
            "{\"tx_hash\":\"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\",\"height\":7}",
            "\"\u{7f}\"",
        ] {
            assert!(is_one_value(text), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn invalid_or_unusual_values_fail() {
        for text in [
            "",
            " 1",
            "1 ",
            "01",
            "1.",
            ".5",
            "1e",
            "-",
            "+1",
            "tru",
            "nul",
            "\"abc",
            "\"a\nb\"",
            "\"\\x\"",
            "\"\\u12g4\"",
            "\"\\ud83d\\ude00\"",
            "[1,]",
            "[1 2]",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "{1:2}",
            "[1]]",
            "1,2",
            "NaN",
        ] {
            assert!(!is_one_value(text), "{text:?}");
        }
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(!is_one_value(&deep));
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(is_one_value(&ok));
    }

    #[test]
    fn members_in_order_with_their_text() {
        let mut seen = Vec::new();
        assert!(each_member(
            "{\"id\": 1, \"method\":\"m\" ,\"params\":[\"a\",{\"b\":null}]} ",
            |k, v| {
                seen.push((k, v));
                true
            }
        ));
        assert_eq!(
            seen,
            [
                ("id", "1"),
                ("method", "\"m\""),
                ("params", "[\"a\",{\"b\":null}]")
            ]
        );
        assert!(each_member("{}", |_, _| false));
        for bad in [
            " {}",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{\"a\":1} x",
            "{\"\\u0069d\":1}",
            "{\"a\":01}",
            "[1]",
            "{\"a\":1",
        ] {
            assert!(!each_member(bad, |_, _| true), "{bad}");
        }
        assert!(!each_member("{\"a\":1,\"b\":2}", |k, _| k != "b"));
    }

    #[test]
    fn text_that_needs_no_escape() {
        assert!(needs_no_escape("blockchain.scripthash.get_history"));
        assert!(needs_no_escape("é日本 and more than eight bytes"));
        assert!(needs_no_escape(""));
        for bad in [
            "a\"b",
            "blockchain.scripthash\\x",
            "blockchain.scripthash.get\u{1}",
            "\n",
        ] {
            assert!(!needs_no_escape(bad), "{bad:?}");
        }
    }

    #[test]
    fn control_characters_are_found_in_any_position_of_a_word() {
        // The first mark of a word is exact, whatever follows it.
        assert!(is_one_value(
            "\"abc\\u00e9\\\"x\\\\yz\\n\u{1ff}\u{80}é日本\\/12345678\""
        ));
        for pos in 0..20 {
            let mut s = "a".repeat(20);
            s.replace_range(pos..pos + 1, "\u{1}");
            assert!(!is_one_value(&format!("\"{s}\"")), "{pos}");
            let mut q = "b".repeat(20);
            q.replace_range(pos..pos + 1, "\"");
            assert!(!is_one_value(&format!("\"{q}\"")), "{pos}");
        }
    }
}
