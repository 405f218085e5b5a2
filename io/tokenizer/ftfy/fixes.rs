//! ftfy's character-level fixes, each a pure function of the text (the ones `fix_text` runs after the encoding
//! repair, plus `fix_c1_controls`, which the encoding repair also uses).

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

use super::charset::CharSet;
use super::codecs;
use super::tables;

fn set(cell: &'static OnceLock<CharSet>, tables: &[&[(u32, u32)]]) -> &'static CharSet {
    cell.get_or_init(|| CharSet::of(tables))
}

fn translation(
    cell: &'static OnceLock<HashMap<char, &'static str>>,
    table: &'static [(u32, &'static str)],
) -> &'static HashMap<char, &'static str> {
    cell.get_or_init(|| table.iter().filter_map(|&(c, to)| Some((char::from_u32(c)?, to))).collect())
}

fn translate(text: &str, map: &HashMap<char, &str>) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match map.get(&c) {
            Some(to) => out.push_str(to),
            None => out.push(c),
        }
    }
    out
}

/// C1 controls (U+0080..U+009F, Latin-1's reading of bytes 0x80..0x9F) read as windows-1252 instead, as
/// browsers do; the five bytes windows-1252 leaves unassigned stay as they are.
pub fn fix_c1_controls(text: &str) -> String {
    let sloppy = codecs::charmap("sloppy-windows-1252");
    text.chars()
        .map(|c| match u32::from(c) {
            code @ 0x80..=0x9F => sloppy.decode_byte(code as u8),
            _ => c,
        })
        .collect()
}

/// ﬁ → fi, ĳ → ij, ǆ → dž and the other Latin ligatures and digraphs ftfy lists.
pub fn fix_latin_ligatures(text: &str) -> String {
    static MAP: OnceLock<HashMap<char, &'static str>> = OnceLock::new();
    translate(text, translation(&MAP, tables::LIGATURES))
}

/// Full-width ASCII and half-width katakana/hangul to their usual forms (what NFKC does to U+FF01..U+FFEF),
/// and the ideographic space U+3000 to a space.
pub fn fix_character_width(text: &str) -> String {
    static MAP: OnceLock<HashMap<char, &'static str>> = OnceLock::new();
    translate(text, translation(&MAP, tables::WIDTH_MAP))
}

/// Curly single quotes (and ʼ) to `'`, curly double quotes to `"`.
pub fn uncurl_quotes(text: &str) -> String {
    static SINGLE: OnceLock<CharSet> = OnceLock::new();
    static DOUBLE: OnceLock<CharSet> = OnceLock::new();
    let (single, double) = (set(&SINGLE, &[tables::SINGLE_QUOTES]), set(&DOUBLE, &[tables::DOUBLE_QUOTES]));
    text.chars()
        .map(|c| {
            if double.contains(c) {
                '"'
            } else if single.contains(c) {
                '\''
            } else {
                c
            }
        })
        .collect()
}

/// CRLF, CR, U+2028, U+2029 and U+0085 to `\n`.
pub fn fix_line_breaks(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                out.push('\n');
            }
            '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('\n'),
            _ => out.push(c),
        }
    }
    out
}

/// ANSI terminal escapes (`ESC [ digits-and-semicolons letter`); "digits" are Python's `\d`, every decimal
/// digit of Unicode.
pub fn remove_terminal_escapes(text: &str) -> String {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    if !text.contains('\u{1B}') {
        return text.to_string();
    }
    let pattern = PATTERN.get_or_init(|| {
        let digits = CharSet::of(&[tables::PY_DIGIT]).union(&CharSet::chars(";"));
        Regex::new(&format!("\\x1B\\[{}*[a-zA-Z]", digits.class())).expect("terminal escape pattern")
    });
    pattern.replace_all(text, "").into_owned()
}

/// Controls with no visible effect: C0 controls other than tab, line feed, form feed and carriage return,
/// DEL, the deprecated Arabic format controls U+206A..U+206F, U+FEFF and U+FFF9..U+FFFC.
pub fn remove_control_chars(text: &str) -> String {
    static CONTROLS: OnceLock<CharSet> = OnceLock::new();
    let controls = set(&CONTROLS, &[tables::CONTROL_CHARS]);
    text.chars().filter(|&c| !controls.contains(c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn character_fixes() {
        assert_eq!(fix_c1_controls("a\u{80}b\u{81}\u{93}"), "a€b\u{81}“");
        assert_eq!(fix_latin_ligatures("ﬂuﬃeﬆ ĳ"), "fluffiest ij");
        assert_eq!(fix_character_width("ＬＯＵＤ　ＮＯＩＳＥＳ ｶ"), "LOUD NOISES カ");
        assert_eq!(uncurl_quotes("\u{201c}here\u{2019}s\u{201d} \u{2bc}"), "\"here's\" '");
        assert_eq!(fix_line_breaks("a\r\nb\rc\u{2028}d\u{85}e\n"), "a\nb\nc\nd\ne\n");
        assert_eq!(remove_terminal_escapes("\u{1b}[36;44mblue\u{1b}[0m \u{1b}[\u{661}m"), "blue ");
        assert_eq!(remove_control_chars("a\u{0}\u{7}\t\u{b}\u{c}\u{7f}\u{feff}\u{200d}b"), "a\t\u{c}\u{200d}b");
    }
}
