//! A time-to-first-token model per engine, fitted online from the TTFTs the engine actually
//! delivers, in place of the fixed weights of `score::ScoreWeights`.
//!
//! The model has the fixed one's form (`score::predicted_ttft_ms`): a first step, a cost per
//! request waiting ahead, per uncached prompt token and per running request. Its four
//! coefficients are fitted by recursive least squares with forgetting ([`TtftModel`]): each
//! observation costs a few dozen multiplications, memory is a 4x4 matrix per engine, and an
//! engine whose behaviour changes (another model, a longer context, a busier batch) is followed
//! within a few hundred requests. It starts from the fixed weights, so a new engine is predicted
//! as before until its own answers say otherwise.
//!
//! Routing uses a fit ([`Fit`]) once it has seen [`MIN_SAMPLES`] answers, with every
//! coefficient held non-negative (more waiting never predicts a faster start). The prediction
//! error of both models is measured on each answer before the answer is learned from
//! (prequential), so the comparison is honest.

use serde::{Deserialize, Serialize};

use crate::score::ScoreWeights;

/// Answers a model must have learned from before routing uses it.
pub const MIN_SAMPLES: u64 = 32;
/// Forgetting factor: an observation's weight halves after about 140 newer ones.
const LAMBDA: f64 = 0.995;
/// Prior confidence in the fixed weights (the initial covariance's diagonal).
const PRIOR_VARIANCE: f64 = 100.0;
/// Bound on the covariance's trace: with forgetting, directions the data never excites would
/// otherwise grow without limit.
const MAX_TRACE: f64 = 1e5;
/// How far a peer's gossiped fit may stray from the fixed weights, either way.
pub const PEER_FACTOR: f32 = 8.0;
/// TTFTs beyond this (ms) are not learned from: a stall, not the engine's usual behaviour.
const MAX_TTFT_MS: f64 = 120_000.0;

/// What a TTFT is predicted from, as known when the request was sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features {
    /// Requests waiting ahead (reported, plus unreported in flight).
    pub waiting: f64,
    /// Prompt tokens the engine must compute (not cached).
    pub uncached_tokens: f64,
    /// Requests the engine is running.
    pub running: f64,
}

impl Features {
    /// Scaled so that the coefficients are of similar size: per request waiting, per 1,000
    /// tokens, per 10 running.
    fn x(&self) -> [f64; 4] {
        [1.0, self.waiting.max(0.0), self.uncached_tokens.max(0.0) / 1000.0, self.running.max(0.0) / 10.0]
    }
}

/// Fitted coefficients, as routing uses them (ms).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fit {
    pub first_step_ms: f32,
    pub per_waiting_ms: f32,
    pub per_uncached_token_ms: f32,
    pub per_running_ms: f32,
}

impl Fit {
    pub fn of(w: &ScoreWeights) -> Self {
        Self {
            first_step_ms: w.first_step_ms as f32,
            per_waiting_ms: w.queue_ms_per_waiting as f32,
            per_uncached_token_ms: w.prefill_ms_per_token as f32,
            per_running_ms: w.queue_ms_per_running as f32,
        }
    }

    /// The prediction for `f` (ms).
    pub fn predict(&self, f: &Features) -> f64 {
        f64::from(self.first_step_ms)
            + f.waiting * f64::from(self.per_waiting_ms)
            + f.uncached_tokens * f64::from(self.per_uncached_token_ms)
            + f.running * f64::from(self.per_running_ms)
    }

    /// A peer's fit as routing may use it: `None` unless sane, and each coefficient held within
    /// [`PEER_FACTOR`] of this node's fixed weights either way, so that a peer gossiping a fit
    /// (mistaken or hostile) moves its engines' predictions no further than lying about their
    /// load could.
    pub fn bounded_by(&self, reference: &Fit) -> Option<Fit> {
        if !self.is_sane() {
            return None;
        }
        let b = |c: f32, r: f32| c.clamp(r / PEER_FACTOR, (r * PEER_FACTOR).max(r / PEER_FACTOR));
        Some(Fit {
            first_step_ms: b(self.first_step_ms, reference.first_step_ms),
            per_waiting_ms: b(self.per_waiting_ms, reference.per_waiting_ms),
            per_uncached_token_ms: b(self.per_uncached_token_ms, reference.per_uncached_token_ms),
            per_running_ms: b(self.per_running_ms, reference.per_running_ms),
        })
    }

    /// Finite, non-negative and below a minute per unit.
    pub fn is_sane(&self) -> bool {
        [self.first_step_ms, self.per_waiting_ms, self.per_uncached_token_ms, self.per_running_ms]
            .iter()
            .all(|c| c.is_finite() && (0.0..60_000.0).contains(c))
    }
}

fn prior_covariance() -> [[f64; 4]; 4] {
    let mut p = [[0.0; 4]; 4];
    for (i, row) in p.iter_mut().enumerate() {
        row[i] = PRIOR_VARIANCE;
    }
    p
}

/// One engine's online TTFT model.
#[derive(Debug, Clone)]
pub struct TtftModel {
    theta: [f64; 4],
    p: [[f64; 4]; 4],
    samples: u64,
}

impl TtftModel {
    /// A model that predicts as the fixed weights do until it learns otherwise.
    pub fn new(w: &ScoreWeights) -> Self {
        let theta =
            [w.first_step_ms, w.queue_ms_per_waiting, w.prefill_ms_per_token * 1000.0, w.queue_ms_per_running * 10.0];
        Self { theta, p: prior_covariance(), samples: 0 }
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The raw prediction (ms), before any bound.
    pub fn predict(&self, f: &Features) -> f64 {
        let x = f.x();
        (0..4).map(|i| self.theta[i] * x[i]).sum::<f64>().max(0.0)
    }

    /// Learns from one answer: `ttft_ms` for a request sent with features `f`.
    pub fn observe(&mut self, f: &Features, ttft_ms: f64) {
        if !(ttft_ms.is_finite() && (0.0..MAX_TTFT_MS).contains(&ttft_ms)) {
            return;
        }
        let x = f.x();
        let px: [f64; 4] = std::array::from_fn(|i| (0..4).map(|j| self.p[i][j] * x[j]).sum());
        let denom = LAMBDA + (0..4).map(|i| x[i] * px[i]).sum::<f64>();
        if !(denom.is_finite() && denom > 0.0) {
            // Rounding broke the covariance: start its confidence over, keep the estimate.
            self.p = prior_covariance();
            return;
        }
        let k: [f64; 4] = std::array::from_fn(|i| px[i] / denom);
        let err = ttft_ms - (0..4).map(|i| self.theta[i] * x[i]).sum::<f64>();
        for (t, ki) in self.theta.iter_mut().zip(k) {
            *t += ki * err;
        }
        // P = (P - k (P x)^T) / lambda; P is symmetric, so x^T P = (P x)^T.
        for (row, ki) in self.p.iter_mut().zip(k) {
            for (v, pxj) in row.iter_mut().zip(px) {
                *v = (*v - ki * pxj) / LAMBDA;
            }
        }
        // Kept symmetric against rounding.
        for i in 0..4 {
            for j in (i + 1)..4 {
                let m = 0.5 * (self.p[i][j] + self.p[j][i]);
                self.p[i][j] = m;
                self.p[j][i] = m;
            }
        }
        let trace: f64 = (0..4).map(|i| self.p[i][i]).sum();
        if trace > MAX_TRACE {
            let s = MAX_TRACE / trace;
            self.p.iter_mut().flatten().for_each(|v| *v *= s);
        }
        self.samples += 1;
    }

    /// The fit routing uses, once there is enough to go on: each coefficient non-negative.
    pub fn fit(&self) -> Option<Fit> {
        if self.samples < MIN_SAMPLES || !self.theta.iter().all(|t| t.is_finite()) {
            return None;
        }
        let c = |v: f64| v.max(0.0) as f32;
        let fit = Fit {
            first_step_ms: c(self.theta[0]),
            per_waiting_ms: c(self.theta[1]),
            per_uncached_token_ms: c(self.theta[2] / 1000.0),
            per_running_ms: c(self.theta[3] / 10.0),
        };
        fit.is_sane().then_some(fit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// An engine whose TTFT is 20 ms + 150 ms per waiting request + 0.08 ms per uncached
    /// token + 1 ms per running request, with noise: far from the fixed weights.
    fn truth(f: &Features) -> f64 {
        20.0 + 150.0 * f.waiting + 0.08 * f.uncached_tokens + 1.0 * f.running
    }

    fn draw(rng: &mut rand::rngs::SmallRng) -> Features {
        Features {
            waiting: rng.random_range(0..8) as f64,
            uncached_tokens: rng.random_range(0..4000) as f64,
            running: rng.random_range(0..64) as f64,
        }
    }

    #[test]
    fn learns_an_engine_the_fixed_weights_do_not_describe() {
        let w = ScoreWeights::default();
        let mut m = TtftModel::new(&w);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        assert!(m.fit().is_none(), "no fit before MIN_SAMPLES");
        let (mut learned, mut fixed) = (0.0, 0.0);
        for i in 0..2000 {
            let f = draw(&mut rng);
            let y = truth(&f) * rng.random_range(0.9..1.1);
            if i >= 1000 {
                learned += (m.predict(&f) - y).abs();
                fixed += (Fit::of(&w).predict(&f) - y).abs();
            }
            m.observe(&f, y);
        }
        assert!(learned < fixed / 3.0, "learned error {learned:.0} vs fixed {fixed:.0}");
        let fit = m.fit().unwrap();
        assert!((fit.per_waiting_ms - 150.0).abs() < 15.0, "{fit:?}");
        assert!((fit.per_uncached_token_ms - 0.08).abs() < 0.01, "{fit:?}");
    }

    #[test]
    fn follows_an_engine_that_slows_down() {
        let w = ScoreWeights::default();
        let mut m = TtftModel::new(&w);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
        for _ in 0..1000 {
            let f = draw(&mut rng);
            m.observe(&f, truth(&f));
        }
        // Twice as slow from now on.
        for _ in 0..1000 {
            let f = draw(&mut rng);
            m.observe(&f, 2.0 * truth(&f));
        }
        let f = Features { waiting: 4.0, uncached_tokens: 2000.0, running: 32.0 };
        let p = m.predict(&f);
        assert!((p / (2.0 * truth(&f)) - 1.0).abs() < 0.1, "{p} vs {}", 2.0 * truth(&f));
    }

    #[test]
    fn bad_observations_and_constant_features_stay_bounded() {
        let mut m = TtftModel::new(&ScoreWeights::default());
        let f = Features { waiting: 0.0, uncached_tokens: 100.0, running: 0.0 };
        for _ in 0..100_000 {
            m.observe(&f, 30.0);
        }
        m.observe(&f, f64::NAN);
        m.observe(&f, -5.0);
        m.observe(&f, 1e12);
        assert!((m.predict(&f) - 30.0).abs() < 1.0, "{}", m.predict(&f));
        assert!(m.p.iter().flatten().all(|v| v.is_finite()));
        let fit = m.fit().unwrap();
        assert!(fit.is_sane());
        assert!(!Fit { per_waiting_ms: f32::NAN, ..fit }.is_sane());
        assert!(!Fit { first_step_ms: -1.0, ..fit }.is_sane());
        // A peer's all-zero fit is held within a factor of the fixed weights.
        let fixed = Fit::of(&ScoreWeights::default());
        let zero = Fit { first_step_ms: 0.0, per_waiting_ms: 0.0, per_uncached_token_ms: 0.0, per_running_ms: 0.0 };
        let held = zero.bounded_by(&fixed).unwrap();
        assert_eq!(held.per_waiting_ms, fixed.per_waiting_ms / PEER_FACTOR);
        assert_eq!(
            Fit { per_waiting_ms: 1e4, ..fixed }.bounded_by(&fixed).unwrap().per_waiting_ms,
            fixed.per_waiting_ms * PEER_FACTOR
        );
        assert!(Fit { per_waiting_ms: f32::NAN, ..fixed }.bounded_by(&fixed).is_none());
    }
}
