//! Sets of characters given as inclusive code-point ranges (the form of the generated tables), for membership
//! tests and for writing them into `regex` character classes.

#[derive(Debug, Clone, Default)]
pub struct CharSet {
    /// Sorted, non-overlapping, non-adjacent inclusive ranges.
    ranges: Vec<(u32, u32)>,
}

impl CharSet {
    /// The union of several range tables.
    pub fn of(tables: &[&[(u32, u32)]]) -> CharSet {
        let mut set = CharSet::default();
        for table in tables {
            set.ranges.extend_from_slice(table);
        }
        set.normalize();
        set
    }

    /// The characters of `chars` (a plain list, no ranges or escapes).
    pub fn chars(chars: &str) -> CharSet {
        let mut set = CharSet { ranges: chars.chars().map(|c| (u32::from(c), u32::from(c))).collect() };
        set.normalize();
        set
    }

    /// The range `first..=last`.
    pub fn range(first: char, last: char) -> CharSet {
        CharSet { ranges: vec![(u32::from(first), u32::from(last))] }
    }

    pub fn union(mut self, other: &CharSet) -> CharSet {
        self.ranges.extend_from_slice(&other.ranges);
        self.normalize();
        self
    }

    pub fn contains(&self, c: char) -> bool {
        let c = u32::from(c);
        let after = self.ranges.partition_point(|&(first, _)| first <= c);
        after > 0 && self.ranges[after - 1].1 >= c
    }

    /// A `regex` character class matching exactly this set (every character escaped, so none can be read as
    /// class syntax).
    pub fn class(&self) -> String {
        let mut out = String::from("[");
        for &(first, last) in &self.ranges {
            if first == last {
                out.push_str(&format!("\\x{{{first:X}}}"));
            } else {
                out.push_str(&format!("\\x{{{first:X}}}-\\x{{{last:X}}}"));
            }
        }
        out.push(']');
        out
    }

    fn normalize(&mut self) {
        self.ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.ranges.len());
        for &(first, last) in &self.ranges {
            match merged.last_mut() {
                Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
                _ => merged.push((first, last)),
            }
        }
        self.ranges = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::CharSet;

    #[test]
    fn union_membership_and_class() {
        let set = CharSet::of(&[&[(0x61, 0x63), (0x65, 0x65)], &[(0x64, 0x64), (0x100, 0x101)]]);
        assert!(set.contains('a') && set.contains('e') && set.contains('\u{101}'));
        assert!(!set.contains('f') && !set.contains('`') && !set.contains('\u{102}'));
        assert_eq!(set.class(), "[\\x{61}-\\x{65}\\x{100}-\\x{101}]");
        let re = regex::Regex::new(&CharSet::chars("-]^\\").class()).unwrap();
        assert!(re.is_match("]") && re.is_match("-") && !re.is_match("a"));
        assert!(CharSet::range('a', 'z').union(&CharSet::chars("Z")).contains('Z'));
    }
}
