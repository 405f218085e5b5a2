//! Rank-strided reading: of an epoch's stream of items (the order one process reads), stride `index` of `count`
//! takes the items whose position `i` in the epoch has `i % count == index`. Every stride reads and shuffles the
//! whole stream (cheap: no decoding) and decodes only its own items, so the strides together decode each item once
//! and see exactly one process's order.
//!
//! A stride's position is the number of its own items it has consumed in the epoch; these helpers convert between
//! that and positions in the whole stream.

/// One stride of a stream: the items `i` with `i % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stride {
    pub index: u64,
    pub count: u64,
}

impl Stride {
    /// The whole stream (one process).
    pub const WHOLE: Stride = Stride { index: 0, count: 1 };

    pub fn owns(&self, position: u64) -> bool {
        position % self.count == self.index
    }

    /// The position in the whole stream of this stride's `local`-th item.
    pub fn global(&self, local: u64) -> u64 {
        local * self.count + self.index
    }

    /// How many of the first `global` items of the stream are this stride's.
    pub fn own_before(&self, global: u64) -> u64 {
        (global + self.count - 1 - self.index) / self.count
    }
}

/// When the strides `0..consumed.len()` have together consumed exactly the first `c` items of the stream (stride
/// `i` consumed `consumed[i]` of its own), that `c`; `None` when they are at different points (one of them skipped
/// ahead past a bad sample, so another stride's earlier item is still unread).
pub fn common_prefix(consumed: &[u64]) -> Option<u64> {
    let count = consumed.len() as u64;
    let total: u64 = consumed.iter().sum();
    let exact = consumed.iter().enumerate().all(|(i, &n)| Stride { index: i as u64, count }.own_before(total) == n);
    exact.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_partition_the_stream_and_count_their_items() {
        for count in 1..5u64 {
            for total in 0..20u64 {
                let mut seen = 0;
                for index in 0..count {
                    let s = Stride { index, count };
                    let own: Vec<u64> = (0..total).filter(|&i| s.owns(i)).collect();
                    assert_eq!(s.own_before(total), own.len() as u64, "{s:?} before {total}");
                    for (local, &g) in own.iter().enumerate() {
                        assert_eq!(s.global(local as u64), g);
                    }
                    seen += own.len() as u64;
                }
                assert_eq!(seen, total);
            }
        }
    }

    #[test]
    fn a_common_prefix_is_found_only_when_the_strides_cover_one() {
        assert_eq!(common_prefix(&[7]), Some(7));
        assert_eq!(common_prefix(&[3, 3]), Some(6));
        // Rank 0 took item 6 as well: items 0..7 are consumed.
        assert_eq!(common_prefix(&[4, 3]), Some(7));
        // Rank 1 skipped a bad sample and took item 7, while item 6 (rank 0's) is unread.
        assert_eq!(common_prefix(&[3, 4]), None);
        assert_eq!(common_prefix(&[2, 4, 3]), None);
        assert_eq!(common_prefix(&[0, 0]), Some(0));
    }
}
