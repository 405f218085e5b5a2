//! The byte encodings ftfy reinterprets text through.
//!
//! - Its single-byte "charmaps", tried in a fixed order. The `sloppy-windows-*` ones are Windows code pages
//!   whose unassigned bytes pass through as the Latin-1 character of the same number, and in which byte 0x1A
//!   stands for U+FFFD (so that text already damaged by a lossy decoder can be re-encoded).
//! - Python's strict windows-1252 decoder (unassigned bytes are errors).
//! - ftfy's lenient UTF-8 decoder, "utf-8-variants": standard UTF-8 plus CESU-8 (a supplementary character
//!   written as two 3-byte surrogates) and Java's two-byte NUL (0xC0 0x80).

use std::collections::HashMap;
use std::sync::OnceLock;

use super::tables;

const UNDEFINED: u32 = u32::MAX;

/// A single-byte encoding in which every byte decodes to a distinct character.
pub struct Charmap {
    pub name: &'static str,
    decode: &'static [u32; 256],
    encode: HashMap<char, u8>,
}

impl Charmap {
    fn new(name: &'static str, decode: &'static [u32; 256]) -> Charmap {
        let encode = decode.iter().enumerate().filter_map(|(b, &c)| Some((char::from_u32(c)?, b as u8))).collect();
        Charmap { name, decode, encode }
    }

    /// The bytes of `text`; None unless every character is some byte's decoding (ftfy's `possible_encoding`).
    pub fn encode(&self, text: &str) -> Option<Vec<u8>> {
        text.chars().map(|c| self.encode.get(&c).copied()).collect()
    }

    pub fn decode_byte(&self, byte: u8) -> char {
        char::from_u32(self.decode[usize::from(byte)]).unwrap_or('\u{FFFD}')
    }

    pub fn is_sloppy(&self) -> bool {
        self.name.starts_with("sloppy")
    }
}

/// ftfy's charmaps in the order it tries them (latin-1 first).
pub fn charmaps() -> &'static [Charmap] {
    static CHARMAPS: OnceLock<Vec<Charmap>> = OnceLock::new();
    CHARMAPS.get_or_init(|| tables::CHARMAP_ENCODINGS.iter().map(|(name, table)| Charmap::new(name, table)).collect())
}

pub fn charmap(name: &str) -> &'static Charmap {
    charmaps().iter().find(|c| c.name == name).unwrap_or_else(|| panic!("ftfy tables lack the charmap {name}"))
}

/// Python's `bytes.decode("windows-1252")`: None where a byte is unassigned.
pub fn decode_windows_1252(bytes: &[u8]) -> Option<String> {
    bytes
        .iter()
        .map(|&b| match tables::WINDOWS_1252[usize::from(b)] {
            UNDEFINED => None,
            code => char::from_u32(code),
        })
        .collect()
}

/// ftfy's "utf-8-variants" decoder as Python runs it on a whole byte string: None where Python raises
/// `UnicodeDecodeError`.
///
/// The decoder alternates between plain UTF-8 (everything before the next special sequence) and the special
/// sequences themselves, found by a regex whose `$` (Python's: the end, or just before a final newline) makes two
/// odd cases decode: 0xC0 followed by a final `\n` reads as NUL, and a CESU-8 pair whose sixth byte is a final
/// `\n` reads as a supplementary character. Both are reproduced.
pub fn decode_utf8_variants(input: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while !rest.is_empty() {
        let Some(cutoff) = find_special(rest) else {
            out.push_str(std::str::from_utf8(rest).ok()?);
            break;
        };
        if cutoff > 0 {
            out.push_str(std::str::from_utf8(&rest[..cutoff]).ok()?);
            rest = &rest[cutoff..];
            continue;
        }
        if rest[0] == 0xC0 {
            // A Java NUL (0xC0 0x80); a lone trailing 0xC0 is left to the UTF-8 decoder, which rejects it.
            if rest.len() < 2 {
                return None;
            }
            out.push('\0');
            rest = &rest[2..];
        } else if rest.len() < 6 {
            // A surrogate lead too close to the end for a CESU-8 pair: plain UTF-8, which rejects surrogates.
            out.push_str(std::str::from_utf8(rest).ok()?);
            break;
        } else if matches_at_start(rest, CESU8) {
            let code = ((u32::from(rest[1]) & 0x0F) << 16)
                + ((u32::from(rest[2]) & 0x3F) << 10)
                + ((u32::from(rest[4]) & 0x0F) << 6)
                + (u32::from(rest[5]) & 0x3F)
                + 0x10000;
            out.push(char::from_u32(code)?);
            rest = &rest[6..];
        } else {
            // A lone surrogate (0xED 0xA0..0xBF ..): the UTF-8 decoder rejects its three bytes.
            return None;
        }
    }
    Some(out)
}

/// One element of the decoder's special-sequence patterns: a byte in `lo..=hi`, or else Python's `$`.
#[derive(Clone, Copy)]
struct ByteOrEnd {
    lo: u8,
    hi: u8,
    or_end: bool,
}

const fn byte(lo: u8, hi: u8) -> ByteOrEnd {
    ByteOrEnd { lo, hi, or_end: false }
}
const fn byte_or_end(lo: u8, hi: u8) -> ByteOrEnd {
    ByteOrEnd { lo, hi, or_end: true }
}

/// Java's NUL, possibly cut short by the end.
const NULL: &[ByteOrEnd] = &[byte(0xC0, 0xC0), byte_or_end(0x80, 0x80)];
/// A CESU-8 surrogate pair, possibly cut short by the end.
const CESU8: &[ByteOrEnd] = &[
    byte(0xED, 0xED),
    byte_or_end(0xA0, 0xAF),
    byte_or_end(0x80, 0xBF),
    byte_or_end(0xED, 0xED),
    byte_or_end(0xB0, 0xBF),
    byte_or_end(0x80, 0xBF),
];
/// A lone UTF-8-encoded surrogate, possibly cut short by the end.
const SURROGATE: &[ByteOrEnd] = &[byte(0xED, 0xED), byte_or_end(0xA0, 0xBF), byte_or_end(0x80, 0xBF)];

/// Python's `$` in a bytes pattern without MULTILINE: at the end, or before a newline that ends the input.
fn at_end(input: &[u8], at: usize) -> bool {
    at == input.len() || (at + 1 == input.len() && input[at] == b'\n')
}

/// Whether `pattern` matches at `start`. A byte that matches its range cannot also be where `$` matches (it is
/// neither the end nor a newline), so the first choice never needs to be revisited.
fn matches_at(input: &[u8], start: usize, pattern: &[ByteOrEnd]) -> bool {
    let mut at = start;
    for element in pattern {
        if input.get(at).is_some_and(|b| (element.lo..=element.hi).contains(b)) {
            at += 1;
        } else if !(element.or_end && at_end(input, at)) {
            return false;
        }
    }
    true
}

fn matches_at_start(input: &[u8], pattern: &[ByteOrEnd]) -> bool {
    matches_at(input, 0, pattern)
}

/// The first position where a special sequence starts.
fn find_special(input: &[u8]) -> Option<usize> {
    (0..input.len()).find(|&at| [NULL, CESU8, SURROGATE].iter().any(|pattern| matches_at(input, at, pattern)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charmaps_are_ftfys_in_order() {
        let names: Vec<&str> = charmaps().iter().map(|c| c.name).collect();
        assert_eq!(names[0], "latin-1");
        assert_eq!(names.len(), 10);
        let sloppy = charmap("sloppy-windows-1252");
        assert_eq!(sloppy.decode_byte(0x80), '€');
        assert_eq!(sloppy.decode_byte(0x81), '\u{81}');
        assert_eq!(sloppy.decode_byte(0x1A), '\u{FFFD}');
        assert_eq!(sloppy.encode("\u{FFFD}€a"), Some(vec![0x1A, 0x80, b'a']));
        assert!(sloppy.encode("\u{1A}").is_none() && charmap("latin-1").encode("\u{1A}\u{FF}").is_some());
        assert_eq!(decode_windows_1252(b"\x80a"), Some("€a".to_string()));
        assert_eq!(decode_windows_1252(b"\x81"), None);
    }

    #[test]
    fn utf8_variants() {
        assert_eq!(decode_utf8_variants("só 한".as_bytes()).as_deref(), Some("só 한"));
        assert_eq!(decode_utf8_variants(b"a\xc0\x80b").as_deref(), Some("a\0b"));
        // U+1F600 as CESU-8.
        assert_eq!(decode_utf8_variants(b"x\xed\xa0\xbd\xed\xb8\x80y").as_deref(), Some("x\u{1F600}y"));
        assert_eq!(decode_utf8_variants(b"\xed\xa0\x80abcd"), None);
        assert_eq!(decode_utf8_variants(b"ab\xc0"), None);
        assert_eq!(decode_utf8_variants(b"\xff"), None);
        // Python's `$` before a final newline.
        assert_eq!(decode_utf8_variants(b"a\xc0\n").as_deref(), Some("a\0"));
    }
}
