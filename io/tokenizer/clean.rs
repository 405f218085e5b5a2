//! Caption cleanup before splitting, as transformers' `CLIPTokenizer` does it, on either of its two paths:
//!
//! - [`ftfy`]: with the ftfy package installed (as where SD was trained): `ftfy.fix_text`, every run of
//!   whitespace made one space, the ends stripped, the whole text lowercased.
//! - [`basic`]: without ftfy: its `BasicTokenizer(strip_accents=False, do_split_on_punc=False)` removes control
//!   characters, turns every whitespace character into a space, puts spaces around CJK ideographs, applies NFC,
//!   lowercases each whitespace-separated word, and joins the words with single spaces.
//!
//! The basic path's character classes come from the Unicode tables of `unicode-properties`, which may be newer
//! than Python's: characters assigned since Python's Unicode version (so "unassigned", hence removed, in Python)
//! are kept.

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// The ftfy path: `whitespace_clean(ftfy.fix_text(text)).lower()`.
pub fn ftfy(text: &str) -> String {
    let fixed = super::ftfy::fix_text(text);
    // transformers' `re.sub(r"\s+", " ", text)` with the `regex` package, whose `\s` is Unicode's White_Space
    // (Rust's char::is_whitespace); then Python's str.strip(), whose whitespace adds U+001C..U+001F (fix_text
    // has already removed those).
    let mut collapsed = String::with_capacity(fixed.len());
    let mut in_space = false;
    for c in fixed.chars() {
        if c.is_whitespace() {
            if !in_space {
                collapsed.push(' ');
            }
            in_space = true;
        } else {
            collapsed.push(c);
            in_space = false;
        }
    }
    // Python's str.lower() on the whole text: full case mapping with the final-sigma rule, as Rust's.
    collapsed.trim_matches(|c: char| c == ' ' || ('\u{1C}'..='\u{1F}').contains(&c)).to_lowercase()
}

/// The basic path: lowercase words separated by single spaces.
pub fn basic(text: &str) -> String {
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
    use super::{basic as clean, ftfy};

    #[test]
    fn cleans_like_ftfy_then_whitespace_clean() {
        assert_eq!(ftfy("  A  Photo\tof\nTHE\u{3000}Sea  "), "a photo of the sea");
        assert_eq!(ftfy("猫が好き &amp; ＣＡＦÃ©"), "猫が好き & café");
        assert_eq!(ftfy("ΟΔΟΣ ΣΑΣ"), "οδος σας");
        assert_eq!(ftfy("zero\u{200B}width\u{0007}bell"), "zero\u{200B}widthbell");
        assert_eq!(ftfy(""), "");
    }

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
