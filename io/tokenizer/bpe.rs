//! CLIP's byte-level BPE: each UTF-8 byte of a word is mapped to a printable character (GPT-2's table), the
//! word's last symbol gets the `</w>` end-of-word suffix, and the lowest-ranked adjacent pair is merged until
//! no pair has a rank (transformers' `CLIPTokenizer.bpe`).

use std::collections::HashMap;

pub const END_OF_WORD: &str = "</w>";

/// GPT-2's reversible byte → character table: printable Latin-1 bytes map to themselves, the others (controls,
/// space, soft hyphen) to characters from U+0100 on, so that BPE never sees whitespace or control characters.
pub fn byte_to_char_table() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut table = ['\0'; 256];
    let mut next_extra = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        let code = if printable(b) {
            b
        } else {
            next_extra += 1;
            255 + next_extra
        };
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// Merge ranks: the pair's position in merges.txt (lower merges first).
pub struct Merges {
    ranks: HashMap<(String, String), usize>,
}

impl Merges {
    pub fn new(pairs: Vec<(String, String)>) -> Merges {
        let mut ranks = HashMap::with_capacity(pairs.len());
        for (rank, pair) in pairs.into_iter().enumerate() {
            // A repeated pair keeps its last rank, as Python's dict(zip(merges, range(n))) does.
            ranks.insert(pair, rank);
        }
        Merges { ranks }
    }

    pub fn len(&self) -> usize {
        self.ranks.len()
    }

    fn rank(&self, first: &str, second: &str) -> Option<usize> {
        self.ranks.get(&(first.to_string(), second.to_string())).copied()
    }

    /// The BPE symbols of one byte-encoded word (not empty).
    pub fn apply(&self, word: &str) -> Vec<String> {
        let chars: Vec<char> = word.chars().collect();
        let Some((last, init)) = chars.split_last() else { return Vec::new() };
        let mut symbols: Vec<String> = init.iter().map(|c| c.to_string()).collect();
        symbols.push(format!("{last}{END_OF_WORD}"));
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|pair| self.rank(&pair[0], &pair[1]).map(|rank| (rank, pair)))
                .min_by_key(|(rank, _)| *rank)
                .map(|(_, pair)| (pair[0].clone(), pair[1].clone()));
            let Some((first, second)) = best else { break };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut symbols[i]));
                    i += 1;
                }
            }
            symbols = merged;
        }
        symbols
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let table = byte_to_char_table();
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], '\u{0120}'); // "Ġ"
        assert_eq!(table[0], '\u{0100}');
        assert_eq!(table[0xAD], '\u{0143}');
        let mut distinct = table.to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn merges_lowest_rank_first_and_all_occurrences() {
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        let merges = Merges::new(vec![pair("a", "a"), pair("b", "a</w>"), pair("aa", "ba</w>")]);
        assert_eq!(merges.apply("aaba"), vec!["aaba</w>"]);
        assert_eq!(merges.apply("aaaba"), vec!["aa", "a", "ba</w>"]);
        assert_eq!(merges.apply("x"), vec!["x</w>"]);
        assert_eq!(merges.apply("xy"), vec!["x", "y</w>"]);
    }
}
