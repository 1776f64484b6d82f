//! The change monitor: the inspector driven by the table's stream, checking the keys that just
//! changed, where races happen (Uber's Cache Inspector and Meta's Polaris work from the change
//! log the same way), rather than a random sample in which one stale key among 100,000 is
//! found with odds of 0.2 % a run.
//!
//! It reads the stream as its second consumer (an event source mapping of its own, batching a
//! window of changes), waits until the newest change of a batch is a grace period old, and
//! judges each changed key on its newest change in the batch:
//!
//! - **consistent**: nothing cached, or the cached value is what the change made the item
//!   (its new image rendered exactly as the read path caches it), or what the table holds now;
//! - **superseded**: the key's recorded position, or the table, is past the change: a later
//!   change decides, and the monitor judges it when its record comes;
//! - **pending**: the cache differs, and the invalidator has not applied the change yet (the
//!   key's position is behind it, and no key of the batch shows the invalidator past it): a
//!   lagging stream, counted with its age, never an alarm;
//! - **inconsistent**: the cache differs from the item's newest state, and the invalidator has
//!   applied the change (or a later one of the same shard): a stale value that would stick
//!   until its TTL.
//!
//! The new image answers most checks without the table: a strongly consistent `GetItem` is paid
//! only where the cached value differs from it (or the stream carries no new image).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::cache::{OpKind, Order, OrderKind, NOT_FOUND};
use crate::id::ProductId;
use crate::inspect::{InspectError, Inspector};
use crate::metrics::Metric;
use crate::store::ProductStore;

use crate::metrics::monitor as metric;

/// How DynamoDB stamps a record: `ApproximateCreationDateTime` is rounded down to the second
/// (or coarser), so a change may be this much older than its record says it is not.
const STAMP_PRECISION: Duration = Duration::from_secs(1);

/// What a change turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeVerdict {
    Consistent,
    Superseded,
    /// Not applied yet; the change's age when judged.
    Pending(Duration),
    Inconsistent,
}

impl ChangeVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeVerdict::Consistent => "consistent",
            ChangeVerdict::Superseded => "superseded",
            ChangeVerdict::Pending(_) => "pending",
            ChangeVerdict::Inconsistent => "INCONSISTENT",
        }
    }
}

/// One changed key, judged on its newest change in the batch.
#[derive(Debug, Clone)]
pub struct ChangeRow {
    pub key: String,
    /// The change's `SequenceNumber`.
    pub sequence_number: Option<String>,
    /// The key's recorded position when judged.
    pub cached_position: Option<String>,
    pub verdict: ChangeVerdict,
}

/// A batch's outcome.
#[derive(Debug, Clone, Default)]
pub struct ChangeReport {
    pub rows: Vec<ChangeRow>,
    /// Changed keys left out by `MONITOR_SHARE`.
    pub skipped: usize,
    /// Changed keys that could not be judged (the error is logged).
    pub unchecked: usize,
    /// How many inconsistent keys were purged (with repair on).
    pub repaired: usize,
    /// Why changes were unchecked (the first failure), if any were.
    pub error: Option<String>,
}

impl ChangeReport {
    pub fn count(&self, verdict: fn(&ChangeVerdict) -> bool) -> usize {
        self.rows.iter().filter(|r| verdict(&r.verdict)).count()
    }

    pub fn inconsistent(&self) -> impl Iterator<Item = &str> {
        self.rows
            .iter()
            .filter(|r| r.verdict == ChangeVerdict::Inconsistent)
            .map(|r| r.key.as_str())
    }

    pub fn pending(&self) -> usize {
        self.count(|v| matches!(v, ChangeVerdict::Pending(_)))
    }
}

/// What a change made the item, as the read path would cache it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum After {
    /// A document, or [`NOT_FOUND`] for a REMOVE.
    Known(String),
    /// The record does not say (no new image, an unordered write, an image with no JSON form):
    /// the table decides.
    Unknown,
}

/// A changed key to judge: its newest change in the batch.
struct Change {
    key: String,
    id: ProductId,
    sequence_number: Option<String>,
    order: Option<Order>,
    after: After,
    created_ms: Option<i64>,
}

impl<S: ProductStore> Inspector<S> {
    /// The stream-driven check of one batch of stream records (a Lambda DynamoDB event's
    /// `Records`): waits until its newest change is a grace period old, judges every changed
    /// key (or `MONITOR_SHARE` of them), counts and logs the outcome. Never fails the batch: a
    /// change that cannot be judged is counted as unchecked, and the stream moves on.
    pub async fn check_changes(&self, records: &[Value]) -> ChangeReport {
        let (changes, skipped) = self.changes_of(records);
        if let Some(newest) = changes.iter().filter_map(|c| c.created_ms).max() {
            let due = newest + (self.inspect.grace + STAMP_PRECISION).as_millis() as i64;
            let wait = (due - now_ms())
                .clamp(0, (self.inspect.grace + STAMP_PRECISION).as_millis() as i64);
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        let mut report = match self.judge(&changes).await {
            Ok((rows, unchecked)) => ChangeReport {
                rows,
                skipped,
                unchecked,
                ..ChangeReport::default()
            },
            Err(error) => {
                tracing::warn!(%error, changes = changes.len(), "changes not checked");
                ChangeReport {
                    skipped,
                    unchecked: changes.len(),
                    error: Some(crate::store::with_causes(&error)),
                    ..ChangeReport::default()
                }
            }
        };
        let inconsistent: Vec<String> = report.inconsistent().map(str::to_owned).collect();
        for row in report
            .rows
            .iter()
            .filter(|r| r.verdict == ChangeVerdict::Inconsistent)
        {
            // Positions, never the bodies: they are the customer's data.
            tracing::warn!(
                key = row.key,
                sequence_number = row.sequence_number,
                cached_position = row.cached_position,
                repair = self.inspect.repair,
                "cached value differs from the item after its change was applied"
            );
        }
        if self.inspect.repair && !inconsistent.is_empty() {
            match self.cache.purge(&inconsistent).await {
                Ok(_) => report.repaired = inconsistent.len(),
                Err(error) => tracing::warn!(%error, "purging inconsistent keys failed"),
            }
        }
        self.count_changes(&report);
        report
    }

    fn count_changes(&self, report: &ChangeReport) {
        let add = |m: Metric, n: usize| self.change_metrics.add(m, n as u64);
        add(
            metric::CHANGES_CHECKED,
            report.rows.len() - report.count(|v| *v == ChangeVerdict::Superseded),
        );
        add(metric::CHANGES_INCONSISTENT, report.inconsistent().count());
        add(metric::CHANGES_PENDING, report.pending());
        add(
            metric::CHANGES_SUPERSEDED,
            report.count(|v| *v == ChangeVerdict::Superseded),
        );
        add(metric::CHANGES_UNCHECKED, report.unchecked);
        for row in &report.rows {
            if let ChangeVerdict::Pending(age) = row.verdict {
                self.change_metrics
                    .sample(metric::PENDING_AGE, age.as_millis() as u64);
            }
        }
        // A batch with nothing wrong still says so: the alarm needs a 0, not a missing point.
        self.change_metrics.flush_always();
        tracing::info!(
            checked = report.rows.len(),
            inconsistent = report.inconsistent().count(),
            pending = report.pending(),
            skipped = report.skipped,
            unchecked = report.unchecked,
            "changes checked"
        );
    }

    /// Each changed key's newest change in `records`, in the order first seen, and how many
    /// keys `MONITOR_SHARE` left out.
    fn changes_of(&self, records: &[Value]) -> (Vec<Change>, usize) {
        let prefix = &self.settings.key_prefix;
        let mut at: HashMap<String, usize> = HashMap::new();
        let mut changes: Vec<Change> = Vec::new();
        let mut skipped = 0;
        for planned in self.planner.plan(records) {
            let raw = &records[planned.record];
            let removed = raw.get("eventName").and_then(Value::as_str) == Some("REMOVE");
            let after = match (&planned.op.kind, removed) {
                (_, true) => After::Known(NOT_FOUND.to_owned()),
                (OpKind::Set { value, .. }, false) => After::Known(value.clone()),
                (OpKind::Delete, false) => After::Unknown,
            };
            let key = planned.op.key;
            let Ok(id) = ProductId::parse(&key[prefix.len()..], self.settings.key_type) else {
                continue; // a key of the other type: the invalidator deletes it, nothing to judge
            };
            if !self.in_share(&key) {
                skipped += usize::from(!at.contains_key(&key));
                at.insert(key, usize::MAX);
                continue;
            }
            let change = Change {
                created_ms: raw
                    .pointer("/dynamodb/ApproximateCreationDateTime")
                    .and_then(Value::as_f64)
                    .map(|secs| (secs * 1000.0) as i64),
                key: key.clone(),
                id,
                sequence_number: planned.sequence_number,
                order: planned.op.order,
                after,
            };
            match at.get(&key) {
                Some(&i) => changes[i] = change,
                None => {
                    at.insert(key, changes.len());
                    changes.push(change);
                }
            }
        }
        (changes, skipped)
    }

    /// `MONITOR_SHARE` of the keys, the same ones in every batch (so a key's every change is
    /// judged, or none), by a hash of the key that does not change between releases.
    fn in_share(&self, key: &str) -> bool {
        if self.inspect.change_share >= 1.0 {
            return true;
        }
        // FNV-1a, 64 bits, then splitmix64's finaliser: FNV alone leaves the high bits of keys
        // that differ in their last characters alike, and the share is taken from them.
        let mut h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
        (h as f64 / u64::MAX as f64) < self.inspect.change_share
    }

    /// Judges `changes`; a change whose table read failed is left out and counted unchecked.
    async fn judge(&self, changes: &[Change]) -> Result<(Vec<ChangeRow>, usize), InspectError> {
        use std::cmp::Ordering::{Equal, Greater};
        let keys: Vec<String> = changes.iter().map(|c| c.key.clone()).collect();
        let cached = self.cache.values(&keys).await?;
        let positions: Vec<Option<Order>> = cached
            .iter()
            .map(|(_, p)| p.as_deref().and_then(Order::decode))
            .collect();
        // How far the invalidator has got through this batch's shard: the newest change whose
        // key holds its position or a later one. A batch comes from one shard, which the
        // invalidator applies in order, so every earlier change has been applied too. Sequence
        // numbers only: versions order one item's changes, not a shard's. Not inferred where the
        // invalidator runs several batches of a shard at once (`ParallelizationFactor` above
        // 1): a later key's position then says nothing of an earlier key's change.
        let reach = changes
            .iter()
            .zip(&positions)
            .filter(|_| self.inspect.shard_order)
            .filter_map(|(c, p)| match (&c.order, p) {
                (Some(r), Some(p)) if r.kind() == OrderKind::Sequence && p >= r => Some(r),
                _ => None,
            })
            .max_by(|a, b| a.partial_cmp(b).unwrap_or(Equal));
        // First what the cache and the record settle alone; the rest need the table.
        let mut verdicts: Vec<Option<ChangeVerdict>> = changes
            .iter()
            .zip(&cached)
            .zip(&positions)
            .map(|((change, (value, _)), position)| match value {
                None => Some(ChangeVerdict::Consistent),
                Some(v) if matches!(&change.after, After::Known(a) if a == v) => {
                    Some(ChangeVerdict::Consistent)
                }
                Some(_) => match (position, &change.order) {
                    (Some(p), Some(r)) if p.partial_cmp(r) == Some(Greater) => {
                        Some(ChangeVerdict::Superseded)
                    }
                    _ => None,
                },
            })
            .collect();
        let open: Vec<usize> = (0..changes.len())
            .filter(|&i| verdicts[i].is_none())
            .collect();
        let mut items = Vec::with_capacity(open.len());
        for chunk in open.chunks(crate::read::MAX_BATCH_IDS) {
            let ids: Vec<ProductId> = chunk.iter().map(|&i| changes[i].id.clone()).collect();
            items.extend(self.store.get_many(&ids).await);
        }
        let now = now_ms();
        let mut unchecked = 0;
        // Judged inconsistent on the shard's progress alone, with what each is expected to be.
        let mut by_progress: Vec<(usize, String)> = Vec::new();
        for (&i, item) in open.iter().zip(items) {
            let item = match item {
                Ok(item) => item,
                Err(error) => {
                    tracing::warn!(%error, key = changes[i].key, "change not checked");
                    unchecked += 1;
                    continue;
                }
            };
            let change = &changes[i];
            let now_form = self.cached_form(item.as_ref());
            let own = match (&change.order, &positions[i]) {
                (Some(r), Some(p)) => p.partial_cmp(r) == Some(Equal),
                _ => false,
            };
            let passed = matches!((&change.order, reach), (Some(r), Some(reach)) if r <= reach);
            let applied = own || passed;
            verdicts[i] = Some(if cached[i].0.as_deref() == Some(now_form.as_str()) {
                // The cache holds the item's newest state (a later change's fill).
                ChangeVerdict::Consistent
            } else if matches!(&change.after, After::Known(a) if *a != now_form) {
                ChangeVerdict::Superseded
            } else if applied && change.after == After::Unknown {
                // Without the record's new image (a KEYS_ONLY or OLD_IMAGE stream), a cache
                // that differs from the item cannot be told from one that holds what this
                // change made while a later change waits for the invalidator: never alarmed
                // on, counted as not judged.
                tracing::debug!(
                    key = change.key,
                    "change not judged: no new image to tell a stale value from lag"
                );
                unchecked += 1;
                continue;
            } else if applied {
                if !own {
                    by_progress.push((i, now_form));
                }
                ChangeVerdict::Inconsistent
            } else {
                let age = change.created_ms.map_or(0, |c| (now - c).max(0));
                ChangeVerdict::Pending(Duration::from_millis(age as u64))
            });
        }
        self.look_again(changes, &cached, by_progress, &mut verdicts)
            .await?;
        let rows = changes
            .iter()
            .zip(cached)
            .zip(verdicts)
            .filter_map(|((change, (_, position)), verdict)| {
                Some(ChangeRow {
                    key: change.key.clone(),
                    sequence_number: change.sequence_number.clone(),
                    cached_position: position,
                    verdict: verdict?,
                })
            })
            .collect();
        Ok((rows, unchecked))
    }
}

impl<S: ProductStore> Inspector<S> {
    /// A change judged inconsistent because later changes of its shard were applied, while its
    /// own key's position is still behind it, may be one the invalidator failed on a node and
    /// is retrying (a batch's partial failure, redelivered from that record): its key is looked
    /// at again a grace period later, and only if neither its value nor its position moved
    /// does it stay inconsistent.
    async fn look_again(
        &self,
        changes: &[Change],
        cached: &[(Option<String>, Option<String>)],
        suspects: Vec<(usize, String)>,
        verdicts: &mut [Option<ChangeVerdict>],
    ) -> Result<(), InspectError> {
        if suspects.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(self.inspect.grace).await;
        let keys: Vec<String> = suspects
            .iter()
            .map(|(i, _)| changes[*i].key.clone())
            .collect();
        let again = self.cache.values(&keys).await?;
        for ((i, now_form), (value, position)) in suspects.into_iter().zip(again) {
            if (&value, &position) == (&cached[i].0, &cached[i].1) {
                continue;
            }
            let change = &changes[i];
            let newer = match (position.as_deref().and_then(Order::decode), &change.order) {
                (Some(p), Some(r)) => p.partial_cmp(r) == Some(std::cmp::Ordering::Greater),
                _ => false,
            };
            let fits =
                |v: &String| *v == now_form || matches!(&change.after, After::Known(a) if a == v);
            verdicts[i] = Some(match &value {
                None => ChangeVerdict::Consistent,
                Some(v) if fits(v) => ChangeVerdict::Consistent,
                Some(_) if newer => ChangeVerdict::Superseded,
                Some(_) => ChangeVerdict::Inconsistent,
            });
        }
        Ok(())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
