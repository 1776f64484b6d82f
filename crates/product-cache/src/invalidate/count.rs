//! The metrics of a handled batch.

use serde_json::Value;

use super::{Invalidator, Planned};
use crate::cache::Cache;
use crate::metrics;

impl<C: Cache> Invalidator<C> {
    /// Counts a handled batch: its size, what was skipped, what goes back to Lambda (every
    /// record from `retried_from` on), what was applied or refused as older (every record of a
    /// key whose collapsed change Redis refused was older than what the key had seen), and how
    /// long after its creation a sample of the applied records reached the cache.
    pub(super) fn count(
        &self,
        records: &[Value],
        plan: &[Planned],
        retried_from: usize,
        refused_keys: &std::collections::HashSet<&str>,
    ) {
        use metrics::invalidator as m;
        let done = || plan.iter().filter(|p| p.record < retried_from);
        let refused = done()
            .filter(|p| refused_keys.contains(p.op.key.as_str()))
            .count();
        let applied = done().count() - refused;
        self.metrics.add(m::BATCH_SIZE, records.len() as u64);
        self.metrics.add(m::RECORDS_APPLIED, applied as u64);
        self.metrics
            .add(m::RECORDS_REFUSED_AS_OLDER, refused as u64);
        self.metrics.add(
            m::RECORDS_SKIPPED_MALFORMED,
            (records.len() - plan.len()) as u64,
        );
        self.metrics
            .add(m::RECORDS_FAILED, (records.len() - retried_from) as u64);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // Evenly spread over the batch, at most the number of values EMF takes.
        let step = applied.div_ceil(metrics::MAX_SAMPLES).max(1);
        for p in done()
            .filter(|p| !refused_keys.contains(p.op.key.as_str()))
            .step_by(step)
        {
            let created = records[p.record]
                .pointer("/dynamodb/ApproximateCreationDateTime")
                .and_then(Value::as_f64);
            if let Some(secs) = created {
                let lag = now_ms - (secs * 1000.0) as i64;
                self.metrics.sample(m::INVALIDATION_LAG, lag.max(0) as u64);
            }
        }
    }
}
