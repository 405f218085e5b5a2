//! A port of `ftfy.fix_text` (ftfy 6.3.1) with its default configuration, the cleanup transformers'
//! `CLIPTokenizer` (and OpenAI's CLIP) apply to every caption when ftfy is installed, as it was where SD and
//! ControlNet were trained.
//!
//! The text is fixed in segments, each a line with its `\n` (or a million code points when lines are longer);
//! each segment goes through these steps, repeated until it stops changing:
//! 1. HTML entities decoded ([`html`]), unless this or an earlier segment holds a `<` (then the text is taken
//!    to be HTML source and its entities are kept, for the rest of the text);
//! 2. mojibake undone ([`encoding`], guided by the heuristic in [`badness`]);
//! 3. C1 controls read as windows-1252, Latin ligatures split, full-/half-width forms normalized, curly quotes
//!    straightened, line breaks made `\n`, terminal escapes and invisible controls removed ([`fixes`]);
//! 4. NFC normalization.
//!
//! ftfy's `fix_surrogates` step has nothing to do here: Rust strings cannot hold surrogate code points, and no
//! step produces them (HTML references to surrogates decode to U+FFFD, the lenient UTF-8 decoder joins CESU-8
//! pairs and rejects lone surrogates).
//!
//! Where the port may differ: the character data of ftfy and of Python's `re` classes are generated from
//! Python 3.11 (Unicode 14.0.0) into [`tables`]; NFC comes from the `unicode-normalization` crate and
//! lowercasing (in the tokenizer) from Rust's standard library, which follow later Unicode versions. Those agree
//! with Python on every code point assigned in Unicode 14.0.0 (tests/io_formats/tokenizer_ftfy.rs checks each one alone),
//! and normalization and case mappings of assigned characters are stable across versions, so only text holding
//! code points unassigned in Unicode 14.0.0 can be cleaned differently, as it can between two Python versions.

mod badness;
mod charset;
mod codecs;
mod encoding;
mod fixes;
mod html;
#[rustfmt::skip]
mod tables;

use unicode_normalization::UnicodeNormalization;

pub use badness::is_bad;
pub use encoding::fix_encoding;
pub use tables::{FTFY_VERSION, PYTHON_UNICODE_VERSION};

/// ftfy's default `max_decode_length`: the longest segment fixed at once, in code points.
const MAX_SEGMENT_CHARS: usize = 1_000_000;

/// `ftfy.fix_text(text)` with the default configuration.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // ftfy's `unescape_html="auto"`: switched off for good at the first segment holding a `<`.
    let mut unescape_html = true;
    for segment in segments(text) {
        if segment.contains('<') {
            unescape_html = false;
        }
        out.push_str(&fix_segment(segment, unescape_html));
    }
    out
}

/// The text cut after each `\n`, and every [`MAX_SEGMENT_CHARS`] code points within longer lines.
fn segments(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len();
        for (count, (at, c)) in rest.char_indices().enumerate() {
            if count == MAX_SEGMENT_CHARS {
                end = at;
                break;
            }
            if c == '\n' {
                end = at + 1;
                break;
            }
        }
        let (segment, after) = rest.split_at(end);
        rest = after;
        Some(segment)
    })
}

/// ftfy's `fix_and_explain` on one segment (without the explanation).
fn fix_segment(segment: &str, unescape_html: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let before = text.clone();
        if unescape_html {
            text = html::unescape_html(&text);
        }
        text = fix_encoding(&text);
        text = fixes::fix_c1_controls(&text);
        text = fixes::fix_latin_ligatures(&text);
        text = fixes::fix_character_width(&text);
        text = fixes::uncurl_quotes(&text);
        text = fixes::fix_line_breaks(&text);
        text = fixes::remove_terminal_escapes(&text);
        text = fixes::remove_control_chars(&text);
        text = text.nfc().collect();
        if text == before {
            return text;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fix_text_examples() {
        assert_eq!(fix_text("âœ” No problems"), "✔ No problems");
        assert_eq!(fix_text("&macr;\\_(ã\u{83}\u{84})_/&macr;"), "¯\\_(ツ)_/¯");
        assert_eq!(fix_text("Broken text&hellip; it&#x2019;s ﬂubberiﬁc!"), "Broken text… it's flubberific!");
        assert_eq!(fix_text("ＬＯＵＤ　ＮＯＩＳＥＳ"), "LOUD NOISES");
        assert_eq!(fix_text(""), "");
    }

    #[test]
    fn html_stays_escaped_from_the_first_line_with_a_tag_on() {
        assert_eq!(fix_text("a &amp; b\n<p> &amp;\n&amp;"), "a & b\n<p> &amp;\n&amp;");
    }

    #[test]
    fn segments_are_lines_or_a_million_code_points() {
        assert_eq!(segments("a\nb\n\nc").collect::<Vec<_>>(), ["a\n", "b\n", "\n", "c"]);
        let long = "é".repeat(MAX_SEGMENT_CHARS + 3);
        let lengths: Vec<usize> = segments(&long).map(|s| s.chars().count()).collect();
        assert_eq!(lengths, [MAX_SEGMENT_CHARS, 3]);
    }
}
