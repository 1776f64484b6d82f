//! Applying a batch's ops in parts, each part's refresh documents rendered just before it goes
//! out, and the parts' outcomes taken as one.

use serde_json::Value;

use super::Invalidator;
use crate::cache::{Cache, CacheOp, OpKind};

/// A refresh batch goes out in this many parts: enough for Redis to store one while the client
/// renders the next, few enough that the parts leave before the first one's reply is back
/// (at 0.5 ms a round trip), so the batch still costs about one round trip.
pub(super) const PARTS: usize = 3;

/// The smallest part: a batch of up to this many ops (the usual 100-record batch) goes out
/// whole, since a part's fixed costs (a pipeline, a script call per node or slot) would
/// outweigh what overlapping saves.
pub(super) const MIN_PART: usize = 200;

/// The outcomes of a batch's parts, as one.
#[derive(Default)]
struct PartsOutcome {
    refused: Vec<usize>,
    under_replicated: Vec<crate::cache::UnderReplicated>,
    blind: bool,
    failed: Vec<usize>,
    first_error: Option<crate::cache::CacheError>,
}

impl PartsOutcome {
    /// A part's outcome, its indexes shifted by `base` (where the part starts in the batch).
    fn absorb(
        &mut self,
        base: usize,
        outcome: Result<crate::cache::Applied, crate::cache::BatchError>,
    ) {
        match outcome {
            Ok(applied) => {
                self.refused
                    .extend(applied.refused.iter().map(|i| base + i));
                self.blind |= applied.blind;
                // Once per node: a batch sent in parts meets the same short node in each.
                for short in applied.under_replicated {
                    match self
                        .under_replicated
                        .iter_mut()
                        .find(|u| u.node == short.node)
                    {
                        Some(known) => known.online = known.online.min(short.online),
                        None => self.under_replicated.push(short),
                    }
                }
            }
            Err(e) => {
                self.failed.extend(e.failed.iter().map(|i| base + i));
                self.first_error.get_or_insert(e.source);
            }
        }
    }

    fn into_result(mut self) -> Result<crate::cache::Applied, crate::cache::BatchError> {
        self.refused.sort_unstable();
        match self.first_error {
            None => Ok(crate::cache::Applied {
                refused: self.refused,
                under_replicated: self.under_replicated,
                blind: self.blind,
            }),
            Some(source) => {
                self.failed.sort_unstable();
                Err(crate::cache::BatchError {
                    failed: self.failed,
                    source,
                })
            }
        }
    }
}

impl<C: Cache> Invalidator<C> {
    /// Applies `ops`, rendering each refresh's document (left for later by the plan) from the
    /// record that decided it, in [`PARTS`] parts of at least [`MIN_PART`] ops: each part goes
    /// out as soon as its documents are built, so the client builds the next while Redis stores
    /// the last, where rendering everything first left Redis idle for milliseconds and the
    /// client idle after (a 1,000-document batch went from about 3x a pipeline of `SET`s to
    /// about 2.5x). A batch without refreshes goes out whole.
    pub(super) async fn apply_rendering(
        &self,
        records: &[Value],
        ops: &mut [CacheOp],
        decided_by: &[usize],
    ) -> Result<crate::cache::Applied, crate::cache::BatchError> {
        let refreshes = ops.iter().any(|op| matches!(op.kind, OpKind::Set { .. }));
        let part_len = ops.len().div_ceil(PARTS).max(MIN_PART);
        if !refreshes || ops.len() <= part_len {
            for (op, &record) in ops.iter_mut().zip(decided_by) {
                self.render_from(op, &records[record]);
            }
            return self.cache.apply(ops).await;
        }
        let mut in_flight = futures::stream::FuturesUnordered::new();
        let mut outcome = PartsOutcome::default();
        for (n, (part, from)) in ops
            .chunks_mut(part_len)
            .zip(decided_by.chunks(part_len))
            .enumerate()
        {
            for (op, &record) in part.iter_mut().zip(from) {
                self.render_from(op, &records[record]);
            }
            let base = n * part_len;
            let part: &[CacheOp] = part;
            in_flight.push(async move { (base, self.cache.apply_after(part, base).await) });
            // Poll the new part until it waits on Redis, and let the connection's task write
            // it (on a one-CPU Lambda that task runs only when this one yields).
            if let std::task::Poll::Ready(Some((base, r))) =
                futures::poll!(futures::StreamExt::next(&mut in_flight))
            {
                outcome.absorb(base, r);
            }
            tokio::task::yield_now().await;
        }
        while let Some((base, r)) = futures::StreamExt::next(&mut in_flight).await {
            outcome.absorb(base, r);
        }
        outcome.into_result()
    }
}
