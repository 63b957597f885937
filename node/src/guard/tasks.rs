//! The guard's background tasks: reloading the keys and guardrails files when they change,
//! and gossiping this node's per-tenant usage so peers count it against the same limits. Both
//! run on the node's task tracker and stop with its cancellation token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kvmesh_gossip::{TenantUsage, UsageReport};
use tokio_util::sync::CancellationToken;

use super::Guard;
use crate::mesh::Mesh;

#[derive(Clone, Copy)]
pub(super) enum Watched {
    Keys,
    Guardrails,
}

/// Re-reads a watched file whenever its modification time or size changes.
pub(super) async fn watch_file(
    guard: Arc<Guard>,
    path: PathBuf,
    what: Watched,
    every: Duration,
    cancel: CancellationToken,
) {
    let stamp = |p: &PathBuf| -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let mut last = stamp(&path);
    // The first check one period from now: an interval's "immediate" first tick still waits for
    // the timer, and a change in between would be taken for one made before `last` was read.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match what {
            Watched::Keys => match guard.reload_keys() {
                Ok(n) => tracing::info!(keys = n, path = %path.display(), "API keys reloaded"),
                Err(e) => tracing::error!(error = %e, "keys file changed but cannot be used; keeping the keys in use"),
            },
            Watched::Guardrails => match guard.reload_rules() {
                Ok(n) => tracing::info!(hooks = n, path = %path.display(), "guardrails reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "guardrails file changed but cannot be used; keeping the rules in use")
                }
            },
        }
    }
}

/// Gossips this node's per-tenant usage so peers count it against the same limits.
pub(super) async fn publish_usage(guard: Arc<Guard>, mesh: Arc<Mesh>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(guard.usage_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = guard.now_ms();
        let Ok(snapshot) = guard.limiter.lock().map(|mut l| l.snapshot(now)) else { continue };
        let report = UsageReport {
            tenants: snapshot
                .into_iter()
                .map(|(t, u)| {
                    // Whole seconds: a ticking countdown would re-gossip an unchanged window.
                    let reset_ms = u.reset_ms.div_ceil(1000) * 1000;
                    (t, TenantUsage { requests: u.requests, tokens: u.tokens, reset_ms })
                })
                .collect(),
        };
        if let Err(e) = mesh.membership.set_usage(&report).await {
            tracing::warn!(error = %e, "publishing tenant usage failed");
        }
    }
}
