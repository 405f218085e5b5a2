//! ftfy's mojibake detector (`is_bad`): text is "bad" when it holds one of a list of character sequences that
//! are far likelier to come from UTF-8 decoded in the wrong single-byte encoding than from real writing, such as
//! an accented lowercase letter followed by a currency sign, or `Ã` followed by a no-break space.
//!
//! The character categories come from ftfy's own tables (`tables::MOJIBAKE_*`); the sequences below are ftfy
//! 6.3.1's, each written as a regex alternative over those categories. Only whether one matches somewhere
//! matters, so their order is free.

use std::sync::OnceLock;

use regex::Regex;

use super::charset::CharSet;
use super::tables;

pub fn is_bad(text: &str) -> bool {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    PATTERN.get_or_init(|| Regex::new(&pattern()).expect("badness pattern")).is_match(text)
}

/// The categories, named as in ftfy.
struct Categories {
    common: CharSet,
    c1: CharSet,
    bad: CharSet,
    law: CharSet,
    currency: CharSet,
    start_punct: CharSet,
    end_punct: CharSet,
    numeric: CharSet,
    kaomoji: CharSet,
    upper_accented: CharSet,
    lower_accented: CharSet,
    upper_common: CharSet,
    lower_common: CharSet,
    box_drawing: CharSet,
}

fn categories() -> Categories {
    let of = |table: &[(u32, u32)]| CharSet::of(&[table]);
    Categories {
        common: of(tables::MOJIBAKE_COMMON),
        c1: of(tables::MOJIBAKE_C1),
        bad: of(tables::MOJIBAKE_BAD),
        law: of(tables::MOJIBAKE_LAW),
        currency: of(tables::MOJIBAKE_CURRENCY),
        start_punct: of(tables::MOJIBAKE_START_PUNCTUATION),
        end_punct: of(tables::MOJIBAKE_END_PUNCTUATION),
        numeric: of(tables::MOJIBAKE_NUMERIC),
        kaomoji: of(tables::MOJIBAKE_KAOMOJI),
        upper_accented: of(tables::MOJIBAKE_UPPER_ACCENTED),
        lower_accented: of(tables::MOJIBAKE_LOWER_ACCENTED),
        upper_common: of(tables::MOJIBAKE_UPPER_COMMON),
        lower_common: of(tables::MOJIBAKE_LOWER_COMMON),
        box_drawing: of(tables::MOJIBAKE_BOX),
    }
}

/// One regex class: the union of the given sets.
fn any(sets: &[&CharSet]) -> String {
    sets.iter().fold(CharSet::default(), |acc, s| acc.union(s)).class()
}

/// The class of the characters listed in `chars` (literally, no ranges).
fn lit(chars: &str) -> String {
    CharSet::chars(chars).class()
}

fn pattern() -> String {
    let k = categories();
    let (bad, c1, law, cur, start, end, num) =
        (&k.bad, &k.c1, &k.law, &k.currency, &k.start_punct, &k.end_punct, &k.numeric);
    let (lower_acc, upper_acc, lower_com, upper_com, bx) =
        (&k.lower_accented, &k.upper_accented, &k.lower_common, &k.upper_common, &k.box_drawing);
    // Python `re`'s \s and \w (Unicode 14, from the tables), not the regex crate's.
    let space = CharSet::of(&[tables::PY_SPACE]).class();
    let word = CharSet::of(&[tables::PY_WORD]).class();
    let ascii_letter = CharSet::range('a', 'z').union(&CharSet::range('A', 'Z')).class();
    let ascii_lower = CharSet::range('a', 'z').class();
    let space_only = CharSet::chars(" ");
    let arabic_tail = any(&[&CharSet::chars("ŸŠ®°µ»"), &k.common, cur, bad, num, start]);

    let rules: Vec<String> = vec![
        // C1 controls are never intended.
        any(&[c1]),
        // The "bad" characters (¦ ¤ ¨ ¬ ¯ ¸ ƒ ˆ ˇ † ‰ ◊ � ...) next to other mojibake-prone characters.
        format!("{}{}", any(&[bad, lower_acc, upper_acc, bx, start, end, cur, num, law]), any(&[bad])),
        format!("{}{}{}", ascii_letter, any(&[lower_com, upper_com]), any(&[bad])),
        format!("{}{}", any(&[bad]), any(&[lower_acc, upper_acc, bx, start, end, cur, num, law])),
        // An uppercase accented letter right after a lowercase or symbol character.
        format!("{}{}", any(&[lower_acc, lower_com, bx, end, cur, num]), any(&[upper_acc])),
        format!("{}{}", any(&[bx, end, cur, num]), any(&[lower_acc])),
        format!("{}{}", any(&[lower_acc, bx, end]), any(&[cur])),
        format!("{space}{}{}", any(&[upper_acc]), any(&[cur])),
        format!("{}{}", any(&[upper_acc, bx]), any(&[num, law])),
        format!("{}{}{}", any(&[lower_acc, upper_acc, bx, cur, end]), any(&[start]), any(&[num])),
        format!("{}{}{}", any(&[lower_acc, upper_acc, cur, num, bx, law]), any(&[end]), any(&[start])),
        format!("{}{}", any(&[cur, num, bx]), any(&[start])),
        format!("{ascii_lower}{}{}", any(&[upper_acc]), any(&[start, cur])),
        format!("{}{}", any(&[bx]), any(&[&k.kaomoji])),
        format!("{}{}", any(&[lower_acc, upper_acc, cur, num, start, end, law]), any(&[bx])),
        format!("{}{}", any(&[bx]), any(&[end])),
        format!("{}{}{word}", any(&[lower_acc, upper_acc]), any(&[start, end])),
        // œ / Œ not followed by an ASCII letter.
        format!("{}[^A-Za-z]", lit("Œœ")),
        // A degree sign after an uppercase accented letter.
        format!("{}{}", any(&[upper_acc]), lit("°")),
        // Two-character windows-1252 mojibake that the rules above miss.
        format!("{}{}", lit("ÂÃÎÐ"), any(&[&CharSet::chars("€œŠš¢£Ÿž\u{a0}\u{ad}®©°·»–—´"), start, end])),
        format!("{}{}", lit("×"), lit("²³")),
        // windows-1252 mojibake of Arabic: four characters, since the second ones include common ones.
        format!("{ar}{arabic_tail}{ar}{arabic_tail}", ar = lit("ØÙ")),
        // windows-1252 mojibake starting 3-byte sequences of some South Asian scripts.
        format!("{}{}", lit("à"), lit("²µ¹¼½¾")),
        // MacRoman mojibake.
        format!("{}{}", lit("√"), lit("±∂†≠®™´≤≥¥µø")),
        format!("{}{}", lit("≈"), lit("°¢")),
        format!("{}{}", regex::escape("‚Ä"), lit("ìîïòôúùû†°¢π")),
        format!("{}{}{}", lit("‚"), lit("âó"), lit("àä°ê")),
        // windows-1251 mojibake of U+2000..U+20FF punctuation.
        regex::escape("вЂ"),
        // windows-1251 mojibake of Latin-1 or Cyrillic: three characters.
        format!("{cyr}{}{cyr}", any(&[c1, bad, start, end, cur, &CharSet::chars("°µ")]), cyr = lit("ВГРС")),
        // windows-1251 on top of windows-1252 mojibake, with a Latin letter or space after it.
        format!(
            "{}.{}",
            regex::escape("ГўВЂВ"),
            any(&[&CharSet::range('A', 'Z'), &CharSet::range('a', 'z'), &space_only])
        ),
        // windows-1252 encodings of à, á and the no-break space.
        format!("{}{}", lit("Ã"), lit("\u{a0}¡")),
        format!("{ascii_lower}{space}?{}{}", lit("ÃÂ"), lit(" ")),
        format!("^{}{}", lit("ÃÂ"), lit(" ")),
        // Â standing before the very character it was meant to be.
        format!(
            "{}{}{}",
            any(&[&CharSet::range('a', 'z'), &CharSet::chars(".,?!"), end]),
            lit("Â"),
            any(&[&space_only, start, end])
        ),
        // windows-1253 mojibake of U+2000..U+20FF punctuation.
        format!("{}{}", regex::escape("β€"), lit("™\u{a0}Ά\u{ad}®°")),
        // windows-1253 mojibake of Latin-1 or Greek: three characters.
        format!("{gr}{}{gr}", any(&[c1, bad, start, end, cur, &CharSet::chars("°")]), gr = lit("ΒΓΞΟ")),
        // windows-1257 mojibake of U+2000..U+20FF punctuation.
        regex::escape("ā€"),
    ];
    rules.join("|")
}

#[cfg(test)]
mod tests {
    use super::is_bad;

    #[test]
    fn detects_mojibake_not_text() {
        let bad = ["cafÃ©", "â€œquotedâ€\u{9d}", "voilÃ le", "Ã la", "\u{85}", "Ð¿Ñ€Ð¸Ð²ÐµÑ‚", "ÃƒÂ©"];
        for text in bad {
            assert!(is_bad(text), "{text:?}");
        }
        let good = ["café", "naïve façade", "Ελληνικά", "привет", "a photo of a cat", "50°C", "¿Qué?", "(╯°□°)╯︵ ┻━┻"];
        for text in good {
            assert!(!is_bad(text), "{text:?}");
        }
    }
}
