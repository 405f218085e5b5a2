//! ftfy's `fix_encoding`: undoing mojibake, UTF-8 that was decoded in a single-byte encoding ("cafÃ©" for
//! "café"), as ftfy 6.3.1 does with its default options.
//!
//! One step: text that is pure ASCII or that the badness heuristic does not flag is left alone. Otherwise each
//! of ftfy's single-byte encodings that can represent the whole text is tried in turn: the text is encoded with
//! it, two byte-level repairs are applied (spaces that were no-break spaces inside UTF-8 sequences; UTF-8
//! sequences that a lossy decoder cut short), and the bytes are decoded as UTF-8 (or ftfy's lenient variant
//! when they hold 0xED or 0xC0); the first that decodes wins. Failing that, mojibake embedded in otherwise good
//! text is fixed piece by piece; then Latin-1 text with C1 controls is read as windows-1252; then any remaining
//! C1 controls are. Steps repeat until the text stops changing.

use std::sync::OnceLock;

use regex::bytes::Regex as BytesRegex;
use regex::Regex;

use super::badness::is_bad;
use super::charset::CharSet;
use super::codecs::{self, charmaps};
use super::fixes::fix_c1_controls;
use super::tables;

pub fn fix_encoding(text: &str) -> String {
    let mut text = text.to_string();
    loop {
        let fixed = fix_encoding_step(&text);
        if fixed == text {
            return text;
        }
        text = fixed;
    }
}

fn fix_encoding_step(text: &str) -> String {
    if text.is_ascii() || !is_bad(text) {
        return text.to_string();
    }
    let mut latin1_possible = false;
    for charmap in charmaps() {
        let Some(mut bytes) = charmap.encode(text) else { continue };
        latin1_possible |= charmap.name == "latin-1";
        // In MacRoman a space after an en dash would look like an altered UTF-8 sequence: ftfy skips it there.
        if charmap.name != "macroman" && altered_utf8().is_match(&bytes) {
            bytes = restore_byte_a0(&bytes);
        }
        if charmap.is_sloppy() {
            bytes = replace_lossy_sequences(&bytes);
        }
        let decoded = if bytes.contains(&0xED) || bytes.contains(&0xC0) {
            codecs::decode_utf8_variants(&bytes)
        } else {
            String::from_utf8(bytes).ok()
        };
        if let Some(fixed) = decoded {
            return fixed;
        }
    }
    if utf8_detector_matches(text).next().is_some() {
        let fixed = decode_inconsistent_utf8(text);
        if fixed != text {
            return fixed;
        }
    }
    // ftfy then asks whether "windows-1252" was among the encodings that could represent the text, to leave
    // text that is both Latin-1 and windows-1252 alone; but its list names "sloppy-windows-1252", so the answer
    // is always no and Latin-1 text is always re-read as (strict) windows-1252. Reproduced as it behaves (its
    // result is what the C1 fallback below would give anyway: both read 0x80..0x9F as windows-1252).
    if latin1_possible {
        let bytes = codecs::charmap("latin-1").encode(text).unwrap_or_default();
        if let Some(fixed) = codecs::decode_windows_1252(&bytes) {
            if fixed != text {
                return fixed;
            }
        }
    }
    if text.chars().any(|c| ('\u{80}'..='\u{9F}').contains(&c)) {
        return fix_c1_controls(text);
    }
    text.to_string()
}

/// UTF-8 sequences that would be valid if a 0xA0 byte had not become a space (0x20).
fn altered_utf8() -> &'static BytesRegex {
    static PATTERN: OnceLock<BytesRegex> = OnceLock::new();
    PATTERN.get_or_init(|| {
        // Continuation bytes, except 0x85 and 0xA0 (whose characters, … and the no-break space, stand alone).
        let cont = r"[\x80-\x84\x86-\x9F\xA1-\xBF]";
        let any = r"[\x80-\xBF]";
        let alternatives = [
            // Two-byte sequences whose lead gives a likely character before 0xA0 (U+A0, à, Š, Π, Р, ٠).
            r"[\xC2\xC3\xC5\xCE\xD0\xD9] ".to_string(),
            format!(r"[\xE2\xE3] {cont}"),
            format!(r"[\xE0-\xE3]{cont} "),
            format!(r"\xF0 {any}{any}"),
            format!(r"\xF0{any} {any}"),
            format!(r"\xF0{any}{any} "),
        ];
        BytesRegex::new(&format!("(?-u){}", alternatives.join("|"))).expect("altered UTF-8 pattern")
    })
}

/// ftfy's `restore_byte_a0`: puts back the 0xA0 bytes that became spaces inside UTF-8 sequences. "Ã " (0xC3
/// 0x20) first becomes "à " (0xC3 0xA0 0x20, keeping the space as a word break) unless followed by a space or
/// by the Portuguese contractions "quele", "quela", "quilo", "s ".
pub fn restore_byte_a0(bytes: &[u8]) -> Vec<u8> {
    let mut spaced = Vec::with_capacity(bytes.len() + 4);
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == 0xC3 && bytes.get(at + 1) == Some(&b' ') {
            let after = &bytes[at + 2..];
            let excluded = [&b" "[..], b"quele", b"quela", b"quilo", b"s "].iter().any(|word| after.starts_with(word));
            if !excluded {
                spaced.extend_from_slice(&[0xC3, 0xA0, b' ']);
                at += 2;
                continue;
            }
        }
        spaced.push(bytes[at]);
        at += 1;
    }
    altered_utf8()
        .replace_all(&spaced, |caps: &regex::bytes::Captures| {
            caps[0].iter().map(|&b| if b == b' ' { 0xA0 } else { b }).collect::<Vec<u8>>()
        })
        .into_owned()
}

/// ftfy's `replace_lossy_sequences`: UTF-8 sequences in which a sloppy codec's 0x1A (from U+FFFD) or a `?` took
/// the place of lost bytes become the UTF-8 of U+FFFD; so does every other 0x1A.
pub fn replace_lossy_sequences(bytes: &[u8]) -> Vec<u8> {
    static PATTERN: OnceLock<BytesRegex> = OnceLock::new();
    let pattern = PATTERN.get_or_init(|| {
        BytesRegex::new(concat!(
            r"(?-u)[\xC2-\xDF]\x1A",
            r"|[\xC2-\xC3]\?",
            r"|\xED[\xA0-\xAF][\x1A?]\xED[\xB0-\xBF][\x1A?\x80-\xBF]",
            r"|\xED[\xA0-\xAF][\x1A?\x80-\xBF]\xED[\xB0-\xBF][\x1A?]",
            r"|[\xE0-\xEF][\x1A?][\x1A\x80-\xBF]",
            r"|[\xE0-\xEF][\x1A\x80-\xBF][\x1A?]",
            r"|[\xF0-\xF4][\x1A?][\x1A\x80-\xBF][\x1A\x80-\xBF]",
            r"|[\xF0-\xF4][\x1A\x80-\xBF][\x1A?][\x1A\x80-\xBF]",
            r"|[\xF0-\xF4][\x1A\x80-\xBF][\x1A\x80-\xBF][\x1A?]",
            r"|\x1A",
        ))
        .expect("lossy UTF-8 pattern")
    });
    pattern.replace_all(bytes, "\u{FFFD}".as_bytes()).into_owned()
}

/// ftfy's `decode_inconsistent_utf8`: each run that looks like UTF-8 mojibake is fixed on its own (with the
/// whole of [`fix_encoding`]) when it is shorter than the text and the badness heuristic flags it alone.
pub fn decode_inconsistent_utf8(text: &str) -> String {
    let length = text.chars().count();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for (start, end) in utf8_detector_matches(text) {
        let run = &text[start..end];
        out.push_str(&text[copied..start]);
        if run.chars().count() < length && is_bad(run) {
            out.push_str(&fix_encoding(run));
        } else {
            out.push_str(run);
        }
        copied = end;
    }
    out.push_str(&text[copied..]);
    out
}

/// The runs ftfy's UTF-8 detector matches, in order and without overlap: one or more characters that a
/// single-byte encoding gives for a UTF-8 lead byte, each followed by as many characters that it gives for
/// continuation bytes (a space may stand for 0xA0), where the character before the run is not a strict
/// continuation character (so that a few characters inside a longer garble are not "fixed" alone).
///
/// ftfy writes the last condition as a lookbehind, which the `regex` crate lacks; it is checked here at each
/// match's start, moving one character on when it fails, which visits the same start positions in the same
/// order as Python's matcher and so finds the same matches.
fn utf8_detector_matches(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    struct Detector {
        body: Regex,
        strict: CharSet,
    }
    static DETECTOR: OnceLock<Detector> = OnceLock::new();
    let detector = DETECTOR.get_or_init(|| {
        let class = |table: &[(u32, u32)]| CharSet::of(&[table]).class();
        let continuation = class(tables::UTF8_CONTINUATION);
        let body = format!(
            "(?:{first2}{continuation}|{first3}{continuation}{{2}}|{first4}{continuation}{{3}})+",
            first2 = class(tables::UTF8_FIRST_OF_2),
            first3 = class(tables::UTF8_FIRST_OF_3),
            first4 = class(tables::UTF8_FIRST_OF_4),
        );
        Detector {
            body: Regex::new(&body).expect("UTF-8 detector pattern"),
            strict: CharSet::of(&[tables::UTF8_CONTINUATION_STRICT]),
        }
    });
    let mut from = 0;
    std::iter::from_fn(move || {
        while let Some(m) = detector.body.find_at(text, from) {
            let preceded_by_strict = text[..m.start()].chars().next_back().is_some_and(|c| detector.strict.contains(c));
            if preceded_by_strict {
                from = m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8);
                continue;
            }
            from = m.end();
            return Some((m.start(), m.end()));
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_repairs() {
        assert_eq!(restore_byte_a0(b"voil\xc3 le"), b"voil\xc3\xa0 le");
        // "Ã s" is excluded from the word rule, but its space still reads as 0xA0 inside a UTF-8 sequence.
        assert_eq!(restore_byte_a0(b"\xc3 s \xc3  \xe2\x80 x"), b"\xc3\xa0s \xc3\xa0 \xe2\x80\xa0x");
        assert_eq!(restore_byte_a0(b"\xe2 \x9c"), b"\xe2\xa0\x9c");
        assert_eq!(replace_lossy_sequences(b"\xe2\x80\x1a \x1a"), "\u{FFFD} \u{FFFD}".as_bytes());
    }

    #[test]
    fn fixes_mojibake() {
        assert_eq!(fix_encoding("cafÃ©"), "café");
        assert_eq!(fix_encoding("â€œquotedâ€\u{9d}"), "“quoted”");
        assert_eq!(fix_encoding("voilÃ le travail"), "voilà le travail");
        assert_eq!(fix_encoding("ÃƒÂ©"), "é");
        assert_eq!(fix_encoding("café"), "café");
    }
}
