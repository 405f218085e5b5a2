//! ftfy's `unescape_html`: HTML entities written `&name;` (HTML5's names that end in a semicolon, plus
//! all-caps spellings of some of them, such as `&EACUTE;`) and numeric references `&#65;` / `&#x41;`, decoded
//! as Python's `html.unescape` decodes them. Entities without the semicolon (`&amp`) are left alone, as is any
//! reference that `html.unescape` would only partly decode.

use std::sync::OnceLock;

use regex::{Captures, Regex};

use super::charset::CharSet;
use super::tables;

/// An entity as ftfy looks for them: `&`, an optional `#`, 1 to 24 ASCII letters or digits, `;`.
fn entity_pattern() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    PATTERN.get_or_init(|| Regex::new("&#?[0-9A-Za-z]{1,24};").expect("entity pattern"))
}

pub fn unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    entity_pattern().replace_all(text, |caps: &Captures| decode_entity(&caps[0])).into_owned()
}

fn decode_entity(entity: &str) -> String {
    if let Ok(at) = tables::HTML_ENTITIES.binary_search_by(|(name, _)| name.cmp(&entity)) {
        return tables::HTML_ENTITIES[at].1.to_string();
    }
    match entity.strip_prefix("&#") {
        Some(reference) => match decode_numeric(&reference[..reference.len() - 1]) {
            // ftfy keeps the entity when the decoded text still holds a semicolon (`&#59;` decodes to `;`).
            Some(decoded) if !decoded.contains(';') => decoded,
            _ => entity.to_string(),
        },
        None => entity.to_string(),
    }
}

/// The text `html.unescape` gives for `&#<digits>;`; None where it would decode only a prefix (`&#12a;`) or
/// nothing, which leaves a `;` in its output (so ftfy keeps the entity).
fn decode_numeric(digits: &str) -> Option<String> {
    let (digits, radix) = match digits.strip_prefix(['x', 'X']) {
        Some(hex) => (hex, 16),
        None => (digits, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    // At most 23 digits: saturate instead of overflowing (anything past U+10FFFF decodes alike).
    let number = digits.chars().fold(0u64, |n, c| {
        n.saturating_mul(u64::from(radix)).saturating_add(u64::from(c.to_digit(radix).unwrap_or(0)))
    });
    Some(python_charref(number))
}

/// Python's `html` rules for a numeric character reference: some numbers have fixed replacements (the
/// windows-1252 meaning of 0x80..0x9F, U+FFFD for 0), surrogates and numbers beyond Unicode become U+FFFD,
/// noncharacters and most controls disappear.
fn python_charref(number: u64) -> String {
    if let Ok(at) = tables::HTML_INVALID_CHARREFS.binary_search_by_key(&number, |&(code, _)| u64::from(code)) {
        return tables::HTML_INVALID_CHARREFS[at].1.to_string();
    }
    let Some(c) = u32::try_from(number).ok().and_then(char::from_u32) else {
        return "\u{FFFD}".to_string();
    };
    static DROPPED: OnceLock<CharSet> = OnceLock::new();
    if DROPPED.get_or_init(|| CharSet::of(&[tables::HTML_INVALID_CODEPOINTS])).contains(c) {
        return String::new();
    }
    c.to_string()
}

#[cfg(test)]
mod tests {
    use super::unescape_html;

    #[test]
    fn entities_as_ftfy_decodes_them() {
        assert_eq!(unescape_html("&lt;tag&gt; &amp; &#39;q&#x27; &nbsp;"), "<tag> & 'q' \u{a0}");
        assert_eq!(unescape_html("P&EACUTE;REZ BUNDESSTRA&SZLIG;E"), "PÉREZ BUNDESSTRASSE");
        assert_eq!(unescape_html("&ntilde; &Ntilde; &NTILDE; &nTILDE;"), "ñ Ñ Ñ &nTILDE;");
        assert_eq!(
            unescape_html("&amp no semicolon, &#59; &#12a; &#x; &#;"),
            "&amp no semicolon, &#59; &#12a; &#x; &#;"
        );
        assert_eq!(unescape_html("&#128; &#0; &#xD800; &#99999999999; &#1;"), "€ \u{FFFD} \u{FFFD} \u{FFFD} ");
    }
}
