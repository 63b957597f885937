//! `kvmesh_latency_summary_seconds`: a Prometheus *summary* (type `summary`, one series per
//! `measure` with `quantile` labels plus `_sum` and `_count`) of time to first token, inter-token
//! gaps and whole requests. Quantiles are exact (hdrhistogram, 2 significant digits) over the
//! last one to two minutes, as client libraries' summaries with a max age are; `_sum` and
//! `_count` cover the node's life, so `rate(_sum) / rate(_count)` gives a mean over any range.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};

use crate::error::NodeError;

/// Quantiles reported by `kvmesh_latency_summary_seconds`.
const QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];
/// A `Recent` answers for the last `RECENT_WINDOW` to twice that.
const RECENT_WINDOW: Duration = Duration::from_secs(60);
const NAME: &str = "kvmesh_latency_summary_seconds";
const HELP: &str = "Streams' ttft and inter_token, answers' e2e: quantiles over the last 1-2 minutes (hdrhistogram, exact to 2 digits; NaN when idle), sum and count over the node's life.";

/// Latencies of the last minute or two in microseconds, in two rotating hdrhistograms: exact
/// quantiles (2 significant digits) of what happened lately, which Prometheus buckets only
/// approximate and lifetime summaries bury. Also counts every value and their sum.
pub struct Recent {
    inner: Mutex<RecentInner>,
}

struct RecentInner {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    since: Instant,
    count: u64,
    sum: f64,
}

/// What one scrape reads of a `Recent`.
struct Snapshot {
    /// `QUANTILES` in seconds; `None` when nothing was recorded in the window.
    quantiles: Option<[f64; 3]>,
    count: u64,
    sum: f64,
}

impl Recent {
    pub(super) fn new() -> Result<Self, NodeError> {
        // 1 µs to 1 h; longer values are clamped to the top.
        let h = Histogram::new_with_bounds(1, 3_600_000_000, 2).map_err(|e| NodeError::Histogram(e.to_string()))?;
        Ok(Self {
            inner: Mutex::new(RecentInner {
                current: h.clone(),
                previous: h,
                since: Instant::now(),
                count: 0,
                sum: 0.0,
            }),
        })
    }

    /// Records one latency. Negative and non-finite values (a clock step) count as 0.
    pub fn record(&self, seconds: f64) {
        let seconds = if seconds.is_finite() { seconds.max(0.0) } else { 0.0 };
        if let Ok(mut r) = self.inner.lock() {
            r.rotate(Instant::now());
            r.current.saturating_record((seconds * 1e6) as u64);
            r.count = r.count.saturating_add(1);
            r.sum += seconds;
        }
    }

    fn snapshot(&self) -> Option<Snapshot> {
        let mut r = self.inner.lock().ok()?;
        r.rotate(Instant::now());
        let mut merged = r.current.clone();
        merged.add(&r.previous).ok()?;
        let quantiles = (!merged.is_empty()).then(|| QUANTILES.map(|q| merged.value_at_quantile(q) as f64 / 1e6));
        Some(Snapshot { quantiles, count: r.count, sum: r.sum })
    }
}

impl RecentInner {
    fn rotate(&mut self, now: Instant) {
        let age = now.duration_since(self.since);
        if age < RECENT_WINDOW {
            return;
        }
        if age >= RECENT_WINDOW * 2 {
            self.previous.reset();
        } else {
            std::mem::swap(&mut self.previous, &mut self.current);
        }
        self.current.reset();
        self.since = now;
    }
}

/// The collector that exports a set of `Recent`s as one summary family, labelled `measure`.
pub(super) struct LatencySummary {
    desc: Desc,
    measures: Vec<(&'static str, Arc<Recent>)>,
}

impl LatencySummary {
    pub(super) fn new<const N: usize>(measures: [(&'static str, Arc<Recent>); N]) -> Result<Self, NodeError> {
        let desc = Desc::new(NAME.into(), HELP.into(), vec!["measure".into()], HashMap::new())?;
        Ok(Self { desc, measures: measures.into() })
    }
}

impl Collector for LatencySummary {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut metrics = Vec::with_capacity(self.measures.len());
        for (measure, recent) in &self.measures {
            let Some(snap) = recent.snapshot() else { continue };
            let mut summary = Summary::default();
            summary.set_sample_count(snap.count);
            summary.set_sample_sum(snap.sum);
            // NaN for an idle window, as a Prometheus summary with no recent observations reports.
            let values = snap.quantiles.unwrap_or([f64::NAN; 3]);
            summary.set_quantile(
                QUANTILES
                    .iter()
                    .zip(values)
                    .map(|(&q, v)| {
                        let mut quantile = Quantile::default();
                        quantile.set_quantile(q);
                        quantile.set_value(v);
                        quantile
                    })
                    .collect(),
            );
            let mut label = LabelPair::default();
            label.set_name("measure".into());
            label.set_value((*measure).into());
            let mut m = Metric::default();
            m.set_label(vec![label]);
            m.set_summary(summary);
            metrics.push(m);
        }
        let mut family = MetricFamily::default();
        family.set_name(NAME.into());
        family.set_help(HELP.into());
        family.set_field_type(MetricType::SUMMARY);
        family.set_metric(metrics);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, Registry, TextEncoder};

    use super::*;

    #[test]
    fn recent_quantiles_are_exact_and_forget_old_windows() {
        let r = Recent::new().unwrap();
        assert!(r.snapshot().unwrap().quantiles.is_none());
        for ms in 1..=100 {
            r.record(ms as f64 / 1000.0);
        }
        let [p50, p90, p99] = r.snapshot().unwrap().quantiles.unwrap();
        for (got, want) in [(p50, 0.050), (p90, 0.090), (p99, 0.099)] {
            assert!((got - want).abs() <= want * 0.01, "{got} vs {want}");
        }
        let mut inner = r.inner.lock().unwrap();
        let t0 = inner.since;
        // One window later the values move to `previous` and still count.
        inner.rotate(t0 + RECENT_WINDOW);
        assert!(inner.current.is_empty());
        assert_eq!(inner.previous.len(), 100);
        // Two windows without a rotation: everything is older than the window, gone.
        let t1 = inner.since;
        inner.current.record(5).unwrap();
        inner.rotate(t1 + RECENT_WINDOW * 2);
        assert!(inner.current.is_empty() && inner.previous.is_empty());
        // Count and sum are lifetime figures: windows do not reset them.
        assert_eq!(inner.count, 100);
        assert!((inner.sum - 5.05).abs() < 1e-9, "{}", inner.sum);
    }

    #[test]
    fn exported_in_prometheus_summary_text_format() {
        let ttft = Arc::new(Recent::new().unwrap());
        let idle = Arc::new(Recent::new().unwrap());
        for s in [0.1, 0.2, 0.3, f64::NAN, -1.0] {
            ttft.record(s);
        }
        let registry = Registry::new();
        registry.register(Box::new(LatencySummary::new([("ttft", ttft), ("e2e", idle)]).unwrap())).unwrap();
        let mut buf = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("# TYPE kvmesh_latency_summary_seconds summary\n"), "{text}");
        assert!(text.contains("kvmesh_latency_summary_seconds{measure=\"ttft\",quantile=\"0.5\"} 0.1"), "{text}");
        assert!(text.contains("kvmesh_latency_summary_seconds{measure=\"ttft\",quantile=\"0.99\"} 0.3"), "{text}");
        // NaN and a negative value count as 0 s: five observations, sum 0.6.
        assert!(text.contains("kvmesh_latency_summary_seconds_count{measure=\"ttft\"} 5\n"), "{text}");
        assert!(text.contains("kvmesh_latency_summary_seconds_sum{measure=\"ttft\"} 0.6"), "{text}");
        assert!(text.contains("kvmesh_latency_summary_seconds{measure=\"e2e\",quantile=\"0.9\"} NaN"), "{text}");
        assert!(text.contains("kvmesh_latency_summary_seconds_count{measure=\"e2e\"} 0\n"), "{text}");
    }
}
