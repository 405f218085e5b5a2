//! The loader's random numbers: SplitMix64, implemented here so the sample order for a seed never changes with
//! a dependency upgrade. Every stream is derived from (seed, purpose, epoch, partition, ...) by hashing, so no
//! generator state needs saving: a position in the data is fully described by the epoch and the samples consumed.

/// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit state advanced by a constant, output through a strong mixer.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl SplitMix64 {
    /// A generator for one purpose, derived from the seed and any number of coordinates (epoch, partition, ...).
    pub fn derive(seed: u64, parts: &[u64]) -> SplitMix64 {
        let mut state = mix(seed ^ GOLDEN);
        for &part in parts {
            state = mix(state.wrapping_add(GOLDEN) ^ mix(part.wrapping_add(GOLDEN)));
        }
        SplitMix64 { state }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift: bias below 2^-40 for any realistic n.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in [0, 1).
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// FNV-1a, a stable 64-bit hash for fingerprints that must survive a restart (std's hasher may change).
#[derive(Debug, Clone)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        // Length-delimit each field so ("ab", "c") and ("a", "bc") differ.
        for b in (bytes.len() as u64).to_le_bytes() {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> =
            (0..4).map(|_| 0).scan(SplitMix64::derive(7, &[1, 2]), |r, _: u64| Some(r.next_u64())).collect();
        let b: Vec<u64> =
            (0..4).map(|_| 0).scan(SplitMix64::derive(7, &[1, 2]), |r, _: u64| Some(r.next_u64())).collect();
        let c: Vec<u64> =
            (0..4).map(|_| 0).scan(SplitMix64::derive(7, &[2, 1]), |r, _: u64| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Pinned values: the sample order of a seed must never change silently.
        assert_eq!(SplitMix64::derive(0, &[]).next_u64(), SplitMix64::derive(0, &[]).next_u64());
        let mut r = SplitMix64::derive(42, &[0]);
        let first: Vec<usize> = (0..8).map(|_| r.below(10)).collect();
        assert_eq!(first, PINNED);
    }

    // Recorded from this implementation; a change here means every saved loader state is invalidated.
    const PINNED: [usize; 8] = [8, 4, 7, 5, 9, 7, 3, 4];

    #[test]
    fn core_generator_is_splitmix64() {
        // Published SplitMix64 outputs for the state 1234567.
        let mut r = SplitMix64 { state: 1_234_567 };
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(r.next_u64(), 9_817_491_932_198_370_423);
    }

    #[test]
    fn below_is_roughly_uniform() {
        let mut r = SplitMix64::derive(1, &[]);
        let mut counts = [0usize; 10];
        for _ in 0..100_000 {
            counts[r.below(10)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
        let u = r.unit_f64();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn fingerprint_separates_fields() {
        let h1 = Fnv::default().bytes(b"ab").bytes(b"c").finish();
        let h2 = Fnv::default().bytes(b"a").bytes(b"bc").finish();
        assert_ne!(h1, h2);
    }
}
