//! A small deterministic random number generator: xoshiro256** seeded through splitmix64.

use serde::{Deserialize, Serialize};

/// A fast, deterministic pseudo-random generator (xoshiro256**, seeded through splitmix64).
///
/// The same seed yields the same sequence on every machine and every target, which is what
/// redundant validation needs: honest peers must draw identical numbers. It is **not**
/// cryptographically secure; never use it for keys, tokens or anything an adversary must not
/// predict.
///
/// The state serializes as four integers, so a unit can store its generator in a checkpoint
/// and continue the exact same stream after a restart.
///
/// The algorithms (generator, seeding, [`Rng::from_bytes`] hashing, [`Rng::below`],
/// [`Rng::next_f64`]) are frozen: changing any of them would change the results of every unit
/// that uses them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "[u64; 4]", into = "[u64; 4]")]
pub struct Rng {
    s: [u64; 4],
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The splitmix64 output function: a bijective mixer with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One step of splitmix64, the generator recommended for seeding xoshiro from a single word.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN_GAMMA);
    mix64(*state)
}

/// A 64-bit non-cryptographic hash of `bytes`, stable across targets and releases.
///
/// The length is folded into the initial state, so zero-padding the last word is unambiguous.
pub(crate) fn hash64(bytes: &[u8]) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3 ^ (bytes.len() as u64).wrapping_mul(GOLDEN_GAMMA);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = mix64(h ^ u64::from_le_bytes(word));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = mix64(h ^ u64::from_le_bytes(word));
    }
    mix64(h.wrapping_add(GOLDEN_GAMMA))
}

impl Rng {
    /// A generator whose whole state is derived from `seed` with splitmix64.
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        // splitmix64 is a bijection of distinct counters, so four consecutive outputs are never
        // all zero (the one state xoshiro cannot leave).
        Rng { s }
    }

    /// A generator seeded from a 64-bit hash of `bytes`; equal bytes give equal streams.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self::seed_from_u64(hash64(bytes))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// The next 32 random bits (the high half of [`Rng::next_u64`], the better half).
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// A uniform float in `[0, 1)` built from 53 random bits, so every value is a multiple of
    /// 2⁻⁵³ and the conversion is exact on every target.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `[0, n)` without modulo bias (Lemire's multiply-and-reject).
    ///
    /// # Panics
    ///
    /// If `n` is zero, since the range is empty.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0): empty range");
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            // Only the low words below 2^64 mod n are over-represented; redraw those.
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }

    /// Advances this generator by 2¹²⁸ draws, as if [`Rng::next_u64`] had been called that
    /// many times: streams started 2¹²⁸ apart never overlap in practice.
    pub fn jump(&mut self) {
        const JUMP: [u64; 4] = [
            0x180e_c6d3_3cfd_0aba,
            0xd5a6_1266_f0c9_392c,
            0xa958_2618_e03f_c9aa,
            0x39ab_dc45_29b1_661c,
        ];
        let mut acc = [0u64; 4];
        for word in JUMP {
            for bit in 0..64 {
                if word & (1u64 << bit) != 0 {
                    for (a, s) in acc.iter_mut().zip(self.s) {
                        *a ^= s;
                    }
                }
                self.next_u64();
            }
        }
        self.s = acc;
    }

    /// Returns an independent generator for a sub-task: the returned one continues the current
    /// stream and `self` jumps 2¹²⁸ draws ahead. Splitting the same way always gives the same
    /// streams.
    pub fn split(&mut self) -> Rng {
        let child = self.clone();
        self.jump();
        child
    }
}

impl From<[u64; 4]> for Rng {
    /// Restores a saved state; the all-zero state, which xoshiro can never leave, is replaced by
    /// the state of `seed_from_u64(0)`.
    fn from(s: [u64; 4]) -> Self {
        if s == [0; 4] {
            Rng::seed_from_u64(0)
        } else {
            Rng { s }
        }
    }
}

impl From<Rng> for [u64; 4] {
    fn from(rng: Rng) -> Self {
        rng.s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference() {
        // First outputs of the reference splitmix64.c with state 0.
        let mut state = 0;
        assert_eq!(splitmix64(&mut state), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(&mut state), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn xoshiro_matches_reference() {
        // Output of the reference xoshiro256starstar.c from the state {1, 2, 3, 4}.
        let mut rng = Rng::from([1, 2, 3, 4]);
        let first: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(first, [11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn fixed_seed_gives_fixed_values() {
        let mut rng = Rng::seed_from_u64(42);
        let first: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(first, FIXED_42);
        let mut again = Rng::seed_from_u64(42);
        assert_eq!(again.next_u64(), FIXED_42[0]);
        assert_ne!(Rng::seed_from_u64(43).next_u64(), FIXED_42[0]);
    }

    // Cross-checked against an independent implementation of the reference algorithms.
    const FIXED_42: [u64; 4] = [
        0x1578_0b2e_0c2e_c716,
        0x6104_d986_6d11_3a7e,
        0xae17_5332_39e4_99a1,
        0xecb8_ad47_03b3_60a1,
    ];

    #[test]
    fn from_bytes_is_fixed_and_input_sensitive() {
        assert_eq!(hash64(b""), HASH_EMPTY);
        assert_eq!(hash64(b"hello, world"), HASH_HELLO);
        assert_ne!(hash64(b"a"), hash64(b"a\0"));
        assert_ne!(hash64(b"12345678"), hash64(b"12345679"));
        assert_eq!(
            Rng::from_bytes(b"hello, world"),
            Rng::seed_from_u64(HASH_HELLO)
        );
    }

    const HASH_EMPTY: u64 = 0x2cb0_f69f_4abe_a221;
    const HASH_HELLO: u64 = 0xcae2_a6cc_ab50_56b9;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = Rng::seed_from_u64(7);
        let mut seen = [false; 10];
        for _ in 0..10_000 {
            let v = rng.below(10);
            assert!(v < 10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(rng.below(1), 0);
        let big = 3 * (1u64 << 62) + 1;
        for _ in 0..1000 {
            assert!(rng.below(big) < big);
        }
    }

    #[test]
    #[should_panic(expected = "empty range")]
    fn below_zero_panics() {
        Rng::seed_from_u64(0).below(0);
    }

    #[test]
    fn floats_are_in_unit_interval() {
        let mut rng = Rng::seed_from_u64(1);
        let mut sum = 0.0;
        for _ in 0..100_000 {
            let x = rng.next_f64();
            assert!((0.0..1.0).contains(&x));
            sum += x;
        }
        assert!((sum / 100_000.0 - 0.5).abs() < 0.01);
    }

    #[test]
    fn split_streams_differ_and_are_reproducible() {
        let mut a = Rng::seed_from_u64(9);
        let mut b = Rng::seed_from_u64(9);
        let mut child_a = a.split();
        let mut child_b = b.split();
        assert_eq!(child_a.next_u64(), child_b.next_u64());
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(child_a.next_u64(), a.next_u64());
    }

    #[test]
    fn state_roundtrips_through_json() {
        let mut rng = Rng::seed_from_u64(5);
        rng.next_u64();
        let json = serde_json::to_string(&rng).unwrap();
        let mut restored: Rng = serde_json::from_str(&json).unwrap();
        assert_eq!(restored.next_u64(), rng.next_u64());
        let zero: Rng = serde_json::from_str("[0,0,0,0]").unwrap();
        assert_eq!(zero, Rng::seed_from_u64(0));
    }
}
