//! Text cleanup before splitting, as transformers' `CLIPTokenizer` does when ftfy is not installed: its
//! `BasicTokenizer(strip_accents=False, do_split_on_punc=False)` removes control characters, turns every
//! whitespace character into a space, puts spaces around CJK ideographs, applies NFC, lowercases each
//! whitespace-separated word, and joins the words with single spaces.
//!
//! Character classes come from the Unicode tables of `unicode-properties`, which may be newer than Python's:
//! characters assigned since Python's Unicode version (so "unassigned", hence removed, in Python) are kept.

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// The cleaned text: lowercase words separated by single spaces.
pub fn clean(text: &str) -> String {
    let mut spaced = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '\0' || c == '\u{FFFD}' || is_control(c) {
            continue;
        }
        if is_whitespace(c) {
            spaced.push(' ');
        } else if is_cjk_ideograph(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    let normalized: String = spaced.nfc().collect();
    // Python's str.split() and str.lower() per word; Rust's lowercasing also applies the final-sigma rule.
    normalized.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// Categories C* (control, format, surrogate, private use, unassigned), except tab, newline and carriage
/// return, which count as whitespace.
fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && c.general_category_group() == GeneralCategoryGroup::Other
}

fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || c.general_category() == GeneralCategory::SpaceSeparator
}

/// The CJK Unified Ideographs blocks BERT's tokenizer singles out (not kana or hangul).
fn is_cjk_ideograph(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B820..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn cleans_like_basic_tokenizer() {
        assert_eq!(clean("  A  Photo\tof\nTHE\u{3000}Sea  "), "a photo of the sea");
        assert_eq!(clean("zero\u{200B}width\u{0007}bell"), "zerowidthbell");
        assert_eq!(clean("猫が好き"), "猫 が 好 き");
        assert_eq!(clean("cafe\u{0301}"), "café");
        assert_eq!(clean("ΟΔΟΣ ΣΑΣ"), "οδος σας");
        assert_eq!(clean(""), "");
    }
}
