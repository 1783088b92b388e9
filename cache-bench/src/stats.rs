//! Medians, percentiles, interleaved rounds, and the helpers every hot loop needs.

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

/// The `q` quantile (0..=1) of `samples`, nearest rank; NaN for no samples.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `samples` (the mean of the two middle ones for an even count).
pub fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// The 99th percentile (nearest rank).
pub fn p99(samples: &[f64]) -> f64 {
    quantile(samples, 0.99)
}

/// Runs each variant once per round for `rounds` rounds, rotating which goes first, so slow
/// phases of a noisy machine hit every variant alike. Returns each variant's samples.
pub fn interleave(rounds: usize, variants: &mut [&mut dyn FnMut() -> f64]) -> Vec<Vec<f64>> {
    let n = variants.len();
    let mut samples = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for i in 0..n {
            let v = (round + i) % n;
            samples[v].push((variants[v])());
        }
    }
    samples
}

/// Polls `future` with a no-op waker until it is ready, without a runtime.
///
/// Meant for futures that are ready at once (a cache hit); it spins, re-polling, if one is
/// not, and panics after a million polls.
#[inline(always)]
pub fn poll_now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => out,
        Poll::Pending => poll_on(future),
    }
}

/// [`poll_now`]'s loop for a future that was not ready on its first poll.
#[cold]
#[inline(never)]
fn poll_on<F: Future>(mut future: Pin<&mut F>) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000_000 {
        std::hint::spin_loop();
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("poll_now: the future was not ready after a million polls (not a hit?)");
}

/// A small deterministic xorshift generator, for access orders and shuffles.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value). The seed is mixed first (splitmix64's finalizer),
    /// so that small seeds differ from their first output on, and the state is never zero.
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)).max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `len` indices in `0..n` in a fixed pseudo-random order (cache-unfriendly on purpose).
pub fn random_indices(n: usize, len: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.below(n)).collect()
}

/// The 16-byte key number `i` (`k/` and 14 digits), as every scenario spells it.
pub fn key(i: usize) -> String {
    format!("k/{i:014}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_give_different_orders() {
        let (a, b) = (
            random_indices(1_000, 8, 0x5EED),
            random_indices(1_000, 8, 0xB16),
        );
        assert_ne!(a, b);
        assert_eq!(a, random_indices(1_000, 8, 0x5EED));
        assert_ne!(random_indices(1_000, 8, 0), random_indices(1_000, 8, 1));
    }

    #[test]
    fn median_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(p99(&hundred), 99.0);
        assert_eq!(quantile(&hundred, 0.5), 50.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn interleave_rotates_the_order() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut a = || {
            order.borrow_mut().push('a');
            1.0
        };
        let mut b = || {
            order.borrow_mut().push('b');
            2.0
        };
        let samples = interleave(2, &mut [&mut a, &mut b]);
        assert_eq!(samples, [vec![1.0, 1.0], vec![2.0, 2.0]]);
        assert_eq!(*order.borrow(), ['a', 'b', 'b', 'a']);
    }

    #[test]
    fn keys_are_16_bytes() {
        assert_eq!(key(7).len(), 16);
        assert_eq!(key(999_999).len(), 16);
    }
}
