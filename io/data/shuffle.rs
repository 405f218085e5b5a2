//! A shuffle buffer (as WebDataset's `shuffle(n)`): keeps up to `capacity` items, and each time hands out one
//! chosen at random, refilling from the input. Shards are streamed, so this is how samples from several shards
//! get mixed without reading a whole shard into memory. Items the predicate marks as urgent (shard errors) pass
//! straight through, so they are reported where they happen.

use super::rng::SplitMix64;

pub struct ShuffleBuffer<I: Iterator> {
    input: I,
    buffer: Vec<I::Item>,
    capacity: usize,
    rng: SplitMix64,
    input_done: bool,
    urgent: fn(&I::Item) -> bool,
}

impl<I: Iterator> ShuffleBuffer<I> {
    /// A capacity of 0 or 1 keeps the input order.
    pub fn new(input: I, capacity: usize, rng: SplitMix64, urgent: fn(&I::Item) -> bool) -> Self {
        ShuffleBuffer {
            input,
            buffer: Vec::with_capacity(capacity.min(1 << 16)),
            capacity,
            rng,
            input_done: false,
            urgent,
        }
    }
}

impl<I: Iterator> Iterator for ShuffleBuffer<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        while !self.input_done && self.buffer.len() < self.capacity.max(1) {
            match self.input.next() {
                Some(item) if (self.urgent)(&item) => return Some(item),
                Some(item) => self.buffer.push(item),
                None => self.input_done = true,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let pick = if self.capacity <= 1 { 0 } else { self.rng.below(self.buffer.len()) };
        Some(self.buffer.swap_remove(pick))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: &u32) -> bool {
        false
    }

    #[test]
    fn is_a_permutation_and_depends_on_seed() {
        let run = |seed| ShuffleBuffer::new(0..100u32, 10, SplitMix64::derive(seed, &[]), never).collect::<Vec<_>>();
        let a = run(1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, run(1));
        assert_ne!(a, run(2));
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        // A buffer of 10 cannot move an item earlier than 9 places before its input position.
        for (pos, &v) in a.iter().enumerate() {
            assert!(v as usize <= pos + 9, "{v} at {pos}");
        }
    }

    #[test]
    fn capacity_one_keeps_order_and_urgent_items_pass() {
        let kept: Vec<u32> = ShuffleBuffer::new(0..5u32, 1, SplitMix64::derive(0, &[]), never).collect();
        assert_eq!(kept, [0, 1, 2, 3, 4]);
        fn is_big(v: &u32) -> bool {
            *v >= 100
        }
        let items = vec![1, 2, 3, 100, 4];
        let out: Vec<u32> = ShuffleBuffer::new(items.into_iter(), 10, SplitMix64::derive(0, &[]), is_big).collect();
        assert_eq!(out[0], 100, "urgent item reported as soon as it is read: {out:?}");
        assert_eq!(out.len(), 5);
    }
}
