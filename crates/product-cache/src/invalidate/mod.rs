//! The invalidator: turns a batch of DynamoDB stream records into cache deletes or refreshes.
//!
//! Records are read one by one from the raw event, so a record that does not match the
//! documented shape costs only itself: its key is still looked for, and if none can be found it
//! is logged and skipped rather than failing the batch and blocking the shard behind it.

use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_json::Value;

mod collapse;

pub use collapse::{collapse, Collapsed};

use crate::cache::{Cache, CacheOp, OpKind, Order};
use crate::config::{CacheSettings, InvalidationMode};
use crate::document::Document;
use crate::id::{KeyType, ProductId};
use crate::metrics::{self, MetricsSettings, Recorder, Sink};

/// What one record asks of the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The record's index in the batch.
    pub record: usize,
    /// The record's `SequenceNumber`.
    pub sequence_number: Option<String>,
    pub op: CacheOp,
}

/// A record whose fields are not where the documented shape puts them.
struct Malformed(&'static str);

/// A refresh batch goes out in this many parts: enough for Redis to store one while the client
/// renders the next, few enough that the parts leave before the first one's reply is back
/// (at 0.5 ms a round trip), so the batch still costs about one round trip.
const PARTS: usize = 3;

/// The smallest part: a batch of up to this many ops (the usual 100-record batch) goes out
/// whole, since a part's fixed costs (a pipeline, a script call per node or slot) would
/// outweigh what overlapping saves.
const MIN_PART: usize = 200;

/// When a refresh's document is built: in planning, or once collapsing has picked the ops that
/// will be sent (`Invalidator::handle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Render {
    Now,
    Later,
}

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

/// Why a record was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("the record has no `{0}` key attribute of type S or N")]
    NoKey(String),
    #[error("the key cannot be a cache key: {0}")]
    UncacheableKey(#[from] crate::id::InvalidId),
}

pub struct Invalidator<C> {
    cache: C,
    mode: InvalidationMode,
    settings: CacheSettings,
    metrics: Recorder,
}

impl<C: Cache> Invalidator<C> {
    pub fn new(cache: C, mode: InvalidationMode, settings: CacheSettings) -> Self {
        Self {
            cache,
            mode,
            settings,
            metrics: Recorder::off("invalidator", &metrics::invalidator::ALL),
        }
    }

    /// Where the metrics go ([`Invalidator::handle`] flushes them after each batch).
    pub fn with_metrics(mut self, settings: MetricsSettings, sink: Sink) -> Self {
        self.metrics.set_sink(settings, sink);
        self
    }

    pub fn metrics(&self) -> &Recorder {
        &self.metrics
    }

    pub fn cache(&self) -> &C {
        &self.cache
    }

    /// Handles one Lambda invocation. Takes the event as JSON so one odd record cannot make the
    /// whole event undeserialisable.
    pub async fn handle(&self, event: Value) -> DynamoDbEventResponse {
        let records = match event.get("Records").and_then(Value::as_array) {
            Some(r) => r.as_slice(),
            None => {
                tracing::error!("event has no `Records` array; nothing to do");
                &[]
            }
        };
        // A refresh's document is rendered after collapsing, part by part as the parts go out
        // (`apply_rendering`): none for records a newer one of their key overrides, and
        // building the next part overlaps with Redis storing the last.
        let mut plan = self.plan_with(records, Render::Later);
        let mut ops = Vec::new();
        let (mut first_records, mut decided_by) = (Vec::new(), Vec::new());
        for c in collapse(&mut plan) {
            ops.push(c.op);
            first_records.push(c.first_record);
            decided_by.push(c.decided_by);
        }
        let mut response = DynamoDbEventResponse::default();
        let mut retried_from = records.len();
        // A refused (older) op is not a failure: the key already holds something newer.
        let mut refused = Vec::new();
        match self.apply_rendering(records, &mut ops, &decided_by).await {
            Ok(applied) => {
                refused = applied.refused;
                // Acknowledged: every replica the node had confirmed it. Fewer than configured
                // is a shard still short of replicas after a failover; only a second failure
                // before its replica has synced can lose these writes.
                for short in &applied.under_replicated {
                    tracing::warn!(
                        node = short.node,
                        online = short.online,
                        configured = short.wanted,
                        "batch confirmed by fewer replicas than configured: the node has no more attached"
                    );
                }
                if !applied.under_replicated.is_empty() {
                    self.metrics
                        .add(metrics::invalidator::BATCHES_UNDER_REPLICATED, 1);
                }
                if applied.blind {
                    self.metrics
                        .add(metrics::invalidator::BATCHES_EVICTION_GUARD_BLIND, 1);
                    // Once per environment: the cause (an ACL, a server's INFO) does not change
                    // from batch to batch, and the metric counts every one.
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        tracing::warn!(
                            "the eviction guard cannot read the node's eviction count (INFO \
                             stats refused, or without evicted_keys): refreshes are applied as \
                             deletes; grant +info|stats to the functions' Redis user"
                        )
                    });
                }
            }
            Err(e) => {
                // The earliest record whose change is not known to be applied: the first
                // record of each failed key. Every record before it either had its key applied
                // or changed no key at all.
                let earliest = e
                    .failed
                    .iter()
                    .map(|&i| first_records[i])
                    .min()
                    .unwrap_or(0);
                retried_from = earliest;
                // Lambda retries from the reported record on. If that record has no sequence
                // number, name the nearest earlier one that does (replaying more is safe: every
                // op is idempotent); with none at all, an empty identifier fails the whole batch.
                let retry_from = records[..=earliest.min(records.len() - 1)]
                    .iter()
                    .rev()
                    .find_map(sequence_number_of);
                tracing::error!(error = %e.source, failed_keys = e.failed.len(), retry_from = ?retry_from, "cache update failed");
                let mut failure = DynamoDbBatchItemFailure::default();
                failure.item_identifier = Some(retry_from.unwrap_or_default());
                response.batch_item_failures.push(failure);
            }
        }
        tracing::info!(
            records = records.len(),
            keys = ops.len(),
            failed = !response.batch_item_failures.is_empty(),
            "batch handled"
        );
        let refused: std::collections::HashSet<&str> =
            refused.iter().map(|&i| ops[i].key.as_str()).collect();
        self.count(records, &plan, retried_from, &refused);
        self.metrics.flush();
        // Freeing a 10,000-record event (hundreds of thousands of small allocations) takes
        // longer than handling it; done on a blocking thread, it is off the invocation's path.
        tokio::task::spawn_blocking(move || drop((event, plan, ops)));
        response
    }

    /// The cache operations for a batch, in record order, skipping records that name no product.
    ///
    /// Records are read in place, field by field, rather than deserialised whole: a batch holds
    /// up to 10,000 of them, and only a few fields of each matter. A record whose fields are
    /// not where the documented shape puts them has its key looked for in `Keys` and either
    /// image, and that key deleted (right whatever the change was); if none can be found, it is
    /// logged and skipped rather than failing the batch and blocking the shard behind it.
    pub fn plan(&self, records: &[Value]) -> Vec<Planned> {
        self.plan_with(records, Render::Now)
    }

    fn plan_with(&self, records: &[Value], render: Render) -> Vec<Planned> {
        let mut plan = Vec::with_capacity(records.len());
        for (index, raw) in records.iter().enumerate() {
            // Looked up once and borrowed: `Value::pointer` would allocate for every step of
            // its path, and at 10,000 records that was the larger part of planning.
            let change = field(raw, "dynamodb").and_then(Value::as_object);
            let sequence_number = change
                .and_then(|c| field_of(c, "SequenceNumber"))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let result = match self.plan_record(raw, change, sequence_number, render) {
                Err(Malformed(what)) => {
                    tracing::warn!(
                        index,
                        ?sequence_number,
                        what,
                        "malformed stream record; deleting its key if it has one"
                    );
                    self.key_of_raw(raw).map(CacheOp::delete)
                }
                Ok(result) => result,
            };
            match result {
                Ok(op) => plan.push(Planned {
                    record: index,
                    sequence_number: sequence_number.map(str::to_owned),
                    op,
                }),
                Err(reason) => {
                    // Named by position and event, not printed: a record carries item bodies.
                    let event_name = raw.get("eventName").and_then(Value::as_str);
                    tracing::error!(index, ?sequence_number, event_name, %reason, "skipping stream record");
                }
            }
        }
        plan
    }

    fn plan_record(
        &self,
        raw: &Value,
        change: Option<&serde_json::Map<String, Value>>,
        sequence_number: Option<&str>,
        render: Render,
    ) -> Result<Result<CacheOp, SkipReason>, Malformed> {
        let change = change.ok_or(Malformed("no `dynamodb` object"))?;
        let event_name = field(raw, "eventName")
            .and_then(Value::as_str)
            .ok_or(Malformed("no `eventName`"))?;
        // `Keys` is in every stream view type; a record without a usable one is not the
        // documented shape either, so its images are searched the same way.
        let key = match self.key_in(field_of(change, "Keys")) {
            Ok(key) => key,
            Err(SkipReason::NoKey(_)) => return Err(Malformed("no usable `Keys`")),
            Err(e) => return Ok(Err(e)),
        };
        let removed = event_name == "REMOVE";
        // Only looked at when it will be logged: it costs lookups in every REMOVE otherwise.
        if removed && tracing::enabled!(tracing::Level::DEBUG) && is_ttl_expiry(raw) {
            tracing::debug!(key, "item expired by TTL");
        }
        if !removed && event_name != "INSERT" && event_name != "MODIFY" {
            tracing::warn!(event_name, key, "unknown event name; deleting");
            return Ok(Ok(CacheOp::delete(key)));
        }
        let image = |name| {
            change
                .get(name)
                .filter(|i| i.as_object().is_some_and(|m| !m.is_empty()))
        };
        let order = self.order_of(
            || image(if removed { "OldImage" } else { "NewImage" }),
            removed,
            sequence_number,
        );
        // KEYS_ONLY or OLD_IMAGE streams carry no new version to write, and a write that
        // cannot be ordered could overwrite a newer one: both become deletes. The image is
        // looked up only for a write: in delete mode no record needs it.
        let refresh = !removed && self.mode == InvalidationMode::Refresh && order.is_some();
        let new_image = if refresh { image("NewImage") } else { None };
        let (true, Some(new_image)) = (refresh, new_image) else {
            return Ok(Ok(CacheOp {
                key,
                kind: OpKind::Delete,
                order,
                created_ms: None,
                delete_if_refused: false,
            }));
        };
        // Seconds, an integer or (in some events) a float. A missing or odd one counts as the
        // epoch: the op then deletes, which is safe.
        let created_ms = change
            .get("ApproximateCreationDateTime")
            .and_then(Value::as_f64)
            .map_or(0, |secs| (secs * 1000.0) as i64)
            - self.settings.clock_margin.as_millis() as i64;
        let mut op = CacheOp {
            key,
            kind: OpKind::Set {
                value: String::new(),
                ttl: self.settings.ttl,
            },
            order,
            created_ms: Some(created_ms),
            delete_if_refused: false,
        };
        if render == Render::Now {
            self.render(&mut op, new_image);
        }
        Ok(Ok(op))
    }

    /// Writes the document of a refresh into `op` from the record's new image. An image with
    /// no JSON form makes the op a delete at the same position: right whatever the change was,
    /// and its position is still recorded, so an older record replayed later is refused.
    fn render(&self, op: &mut CacheOp, new_image: &Value) {
        let OpKind::Set { value, .. } = &mut op.kind else {
            return;
        };
        match Document::from_image(new_image) {
            Ok(doc) => *value = doc.into_string(),
            Err(error) => {
                tracing::warn!(%error, key = op.key, "new image has no JSON form; deleting instead");
                op.kind = OpKind::Delete;
            }
        }
    }

    /// Applies `ops`, rendering each refresh's document (left for later by the plan) from the
    /// record that decided it, in [`PARTS`] parts of at least [`MIN_PART`] ops: each part goes
    /// out as soon as its documents are built, so the client builds the next while Redis stores
    /// the last, where rendering everything first left Redis idle for milliseconds and the
    /// client idle after (a 1,000-document batch went from about 3x a pipeline of `SET`s to
    /// about 2.5x). A batch without refreshes goes out whole.
    async fn apply_rendering(
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

    /// [`Invalidator::render`] from a raw record, for a refresh the plan left unrendered.
    fn render_from(&self, op: &mut CacheOp, raw: &Value) {
        let OpKind::Set { value, .. } = &op.kind else {
            return;
        };
        if !value.is_empty() {
            return;
        }
        let image = field(raw, "dynamodb")
            .and_then(|c| c.get("NewImage"))
            .unwrap_or(&Value::Null);
        self.render(op, image);
    }

    /// Counts a handled batch: its size, what was skipped, what goes back to Lambda (every
    /// record from `retried_from` on), what was applied or refused as older (every record of a
    /// key whose collapsed change Redis refused was older than what the key had seen), and how
    /// long after its creation a sample of the applied records reached the cache.
    fn count(
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

    /// Where the record stands in its item's history: its sequence number, or with a version
    /// attribute configured, the version of the image it leaves behind (a REMOVE ranks just
    /// after the write of the version it removes). `None` when the record does not say, which
    /// makes the op an unordered delete.
    fn order_of<'v>(
        &self,
        image: impl FnOnce() -> Option<&'v Value>,
        removed: bool,
        sequence_number: Option<&str>,
    ) -> Option<Order> {
        let Some(attr) = &self.settings.version_attribute else {
            return Order::sequence(sequence_number?);
        };
        let version = image()?.get(attr)?.get("N")?.as_str()?;
        Order::version(version, removed)
    }

    /// The cache key named in a `Keys`-shaped map (`{"<attr>": {"S": "..."}}`).
    fn key_in(&self, map: Option<&Value>) -> Result<String, SkipReason> {
        let no_key = || SkipReason::NoKey(self.settings.key_attribute.clone());
        let attr = map
            .and_then(|m| field(m, &self.settings.key_attribute))
            .and_then(Value::as_object)
            .ok_or_else(no_key)?;
        let (raw, key_type) = match (field_of(attr, "S"), field_of(attr, "N")) {
            (Some(Value::String(s)), None) => (s, KeyType::S),
            (None, Some(Value::String(n))) => (n, KeyType::N),
            _ => return Err(no_key()),
        };
        Ok(ProductId::cache_key_of(
            raw,
            key_type,
            &self.settings.key_prefix,
        )?)
    }

    /// The cache key a stream record names (in `Keys`, else either image), whatever its shape:
    /// for tools that act on records without applying them (`pcache redrive` past retention).
    pub fn key_of_record(&self, raw: &Value) -> Result<String, SkipReason> {
        self.key_of_raw(raw)
    }

    /// The key of a malformed record: `Keys` first, then either image.
    fn key_of_raw(&self, raw: &Value) -> Result<String, SkipReason> {
        let mut reason = SkipReason::NoKey(self.settings.key_attribute.clone());
        for field in ["Keys", "NewImage", "OldImage"] {
            match self.key_in(raw.get("dynamodb").and_then(|d| d.get(field))) {
                Ok(key) => return Ok(key),
                Err(SkipReason::NoKey(_)) => {}
                Err(e) => reason = e,
            }
        }
        Err(reason)
    }
}

/// `value[name]` for the small objects of a stream record (see [`field_of`]).
fn field<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
    field_of(value.as_object()?, name)
}

/// `map[name]`, found by scanning the entries for one of the same length first. serde_json's
/// map is a B-tree of `String`s: a lookup compares the name with several keys, each compare a
/// read of a separate heap allocation, and over a 10,000-record batch those cache misses were
/// most of the cost of planning. A record's objects have a handful of entries whose lengths
/// (kept in the tree's nodes) mostly differ, so the scan reads one key's bytes, usually the
/// right one. A large object (an image) is looked up the usual way.
fn field_of<'v>(map: &'v serde_json::Map<String, Value>, name: &str) -> Option<&'v Value> {
    if map.len() > 16 {
        return map.get(name);
    }
    map.iter()
        .find(|(k, _)| k.len() == name.len() && k.as_str() == name)
        .map(|(_, v)| v)
}

fn sequence_number_of(record: &Value) -> Option<String> {
    record
        .pointer("/dynamodb/SequenceNumber")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A REMOVE made by DynamoDB's TTL process rather than by a user (`userIdentity` of type
/// `Service`, principal `dynamodb.amazonaws.com`).
pub fn is_ttl_expiry(record: &Value) -> bool {
    let identity = record.get("userIdentity");
    let field = |name| identity.and_then(|i| i.get(name)).and_then(Value::as_str);
    field("type") == Some("Service") && field("principalId") == Some("dynamodb.amazonaws.com")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::memory::MemoryCache;
    use std::sync::atomic::Ordering;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/../../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    pub(super) fn invalidator(mode: InvalidationMode) -> Invalidator<MemoryCache> {
        Invalidator::new(MemoryCache::default(), mode, CacheSettings::default())
    }

    fn ops(inv: &Invalidator<MemoryCache>, name: &str) -> Vec<CacheOp> {
        let event = fixture(name);
        inv.plan(event["Records"].as_array().unwrap())
            .into_iter()
            .map(|p| p.op)
            .collect()
    }

    /// (key, "del" or "set") of each planned op.
    fn kinds(inv: &Invalidator<MemoryCache>, name: &str) -> Vec<(String, &'static str)> {
        ops(inv, name)
            .into_iter()
            .map(|op| {
                let kind = match op.kind {
                    OpKind::Delete => "del",
                    OpKind::Set { .. } => "set",
                };
                (op.key, kind)
            })
            .collect()
    }

    fn del(key: &str) -> Vec<(String, &'static str)> {
        vec![(key.to_owned(), "del")]
    }

    #[test]
    fn delete_mode_deletes_for_every_event_kind() {
        let inv = invalidator(InvalidationMode::Delete);
        for name in [
            "insert.json",
            "modify.json",
            "remove.json",
            "ttl-expiry-remove.json",
            "keys-only.json",
            "float-timestamp.json",
        ] {
            assert_eq!(kinds(&inv, name), del("product:kb-001"), "{name}");
        }
        assert_eq!(kinds(&inv, "number-key.json"), del("product:42"));
    }

    #[test]
    fn refresh_mode_writes_the_new_image_and_deletes_otherwise() {
        let inv = invalidator(InvalidationMode::Refresh);
        let [CacheOp {
            key,
            kind: OpKind::Set { value, ttl },
            ..
        }] = &ops(&inv, "modify.json")[..]
        else {
            panic!("expected one set");
        };
        assert_eq!(key, "product:kb-001");
        assert_eq!(*ttl, CacheSettings::default().ttl);
        let doc: Value = serde_json::from_str(value).unwrap();
        assert_eq!(doc["price"], serde_json::json!(99.99));
        for name in ["remove.json", "ttl-expiry-remove.json", "keys-only.json"] {
            assert_eq!(kinds(&inv, name), del("product:kb-001"), "{name}");
        }
    }

    #[test]
    fn ops_are_ordered_by_sequence_number_by_default() {
        let inv = invalidator(InvalidationMode::Refresh);
        let planned = ops(&inv, "batch-mixed.json");
        let seqs: Vec<_> = fixture("batch-mixed.json")["Records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| Order::sequence(r["dynamodb"]["SequenceNumber"].as_str().unwrap()))
            .collect();
        assert_eq!(
            planned
                .iter()
                .map(|op| op.order.clone())
                .collect::<Vec<_>>(),
            seqs
        );
        assert!(seqs.iter().all(Option::is_some));
    }

    #[test]
    fn with_a_version_attribute_ops_are_ordered_by_it() {
        let settings = CacheSettings {
            version_attribute: Some("version".into()),
            ..CacheSettings::default()
        };
        let inv = Invalidator::new(MemoryCache::default(), InvalidationMode::Refresh, settings);
        let mut event = fixture("modify.json");
        event["Records"][0]["dynamodb"]["NewImage"]["version"] = serde_json::json!({"N": "7"});
        let planned = inv.plan(event["Records"].as_array().unwrap());
        assert_eq!(planned[0].op.order, Order::version("7", false));

        // A REMOVE ranks just after the write of the version it removes.
        let mut event = fixture("remove.json");
        event["Records"][0]["dynamodb"]["OldImage"]["version"] = serde_json::json!({"N": "7"});
        let planned = inv.plan(event["Records"].as_array().unwrap());
        assert_eq!(planned[0].op.order, Order::version("7", true));

        // No version in the record: an unordered delete, never an unordered write.
        let planned = inv.plan(fixture("modify.json")["Records"].as_array().unwrap());
        assert_eq!(planned[0].op, CacheOp::delete("product:kb-001"));
    }

    #[test]
    fn ttl_expiry_is_recognised() {
        assert!(is_ttl_expiry(
            &fixture("ttl-expiry-remove.json")["Records"][0]
        ));
        assert!(!is_ttl_expiry(&fixture("remove.json")["Records"][0]));
    }

    #[test]
    fn a_malformed_record_costs_only_itself() {
        let inv = invalidator(InvalidationMode::Refresh);
        let planned = ops(&inv, "malformed-record.json");
        // The middle record has no Keys and no SizeBytes; its key is recovered from its image and
        // deleted, unordered, whatever the mode; the records around it are handled normally.
        let kinds: Vec<_> = planned
            .iter()
            .map(|op| (op.key.as_str(), matches!(op.kind, OpKind::Set { .. })))
            .collect();
        assert_eq!(
            kinds,
            [
                ("product:kb-001", true),
                ("product:monitor-003", false),
                ("product:mouse-002", true)
            ]
        );
        assert_eq!(planned[1], CacheOp::delete("product:monitor-003"));
    }

    #[test]
    fn a_record_with_empty_or_missing_keys_deletes_the_key_its_images_name() {
        let inv = invalidator(InvalidationMode::Refresh);
        for keys in [Some(serde_json::json!({})), None] {
            let mut event = fixture("modify.json");
            let dynamodb = event["Records"][0]["dynamodb"].as_object_mut().unwrap();
            match &keys {
                Some(empty) => {
                    dynamodb.insert("Keys".into(), empty.clone());
                }
                None => {
                    dynamodb.remove("Keys");
                }
            }
            assert!(dynamodb.contains_key("SizeBytes"), "otherwise well formed");
            let planned = inv.plan(event["Records"].as_array().unwrap());
            assert_eq!(
                planned.iter().map(|p| &p.op).collect::<Vec<_>>(),
                [&CacheOp::delete("product:kb-001")],
                "Keys {keys:?}"
            );
        }
    }

    #[test]
    fn records_without_a_usable_key_are_skipped() {
        let inv = invalidator(InvalidationMode::Delete);
        let mut event = fixture("modify.json");
        let good = event["Records"][0].clone();
        let mut no_key = good.clone();
        no_key["dynamodb"] = serde_json::json!({"SequenceNumber": "5"});
        let mut braces = good.clone();
        braces["dynamodb"]["Keys"]["productId"] = serde_json::json!({"S": "{x}"});
        let mut wrong_type = good.clone();
        wrong_type["dynamodb"]["Keys"]["productId"] = serde_json::json!({"BOOL": true});
        // Images naming the item would be searched next (see the test above): none here.
        for image in ["NewImage", "OldImage"] {
            wrong_type["dynamodb"]
                .as_object_mut()
                .unwrap()
                .remove(image);
        }
        event["Records"] =
            serde_json::json!(["not even an object", no_key, braces, wrong_type, good]);
        let planned = inv.plan(event["Records"].as_array().unwrap());
        assert_eq!(
            planned
                .iter()
                .map(|p| p.op.key.as_str())
                .collect::<Vec<_>>(),
            ["product:kb-001"]
        );
    }

    #[tokio::test]
    async fn a_cache_failure_reports_the_first_record_of_the_batch() {
        let inv = invalidator(InvalidationMode::Delete);
        let event = fixture("batch-mixed.json");
        let ok = inv.handle(event.clone()).await;
        assert!(ok.batch_item_failures.is_empty());
        inv.cache.fail.store(true, Ordering::SeqCst);
        let failed = inv.handle(event).await;
        assert_eq!(failed.batch_item_failures.len(), 1);
        assert_eq!(
            failed.batch_item_failures[0].item_identifier.as_deref(),
            Some("111000000000000000101")
        );
    }

    /// `(key, sequence number)` records as a MODIFY batch.
    pub(super) fn batch(records: &[(&str, Option<u64>)]) -> Value {
        let template = fixture("modify.json")["Records"][0].clone();
        let records: Vec<Value> = records
            .iter()
            .map(|(id, seq)| {
                let mut r = template.clone();
                r["dynamodb"]["Keys"]["productId"] = serde_json::json!({ "S": id });
                match seq {
                    Some(seq) => {
                        r["dynamodb"]["SequenceNumber"] = serde_json::json!(seq.to_string())
                    }
                    None => {
                        r["dynamodb"]
                            .as_object_mut()
                            .unwrap()
                            .remove("SequenceNumber");
                    }
                }
                r
            })
            .collect();
        serde_json::json!({ "Records": records })
    }

    /// A refresh batch of `keys` keys, two records each (the second newer), each record's
    /// price its sequence number.
    fn refresh_batch(keys: usize) -> Value {
        let records: Vec<(String, u64)> = (0..2 * keys)
            .map(|i| (format!("k{}", i % keys), 1000 + i as u64))
            .collect();
        let refs: Vec<(&str, Option<u64>)> = records
            .iter()
            .map(|(k, s)| (k.as_str(), Some(*s)))
            .collect();
        let mut event = batch(&refs);
        for r in event["Records"].as_array_mut().unwrap() {
            let seq = r["dynamodb"]["SequenceNumber"].clone();
            r["dynamodb"]["NewImage"]["price"] = serde_json::json!({ "N": seq });
        }
        event
    }

    /// More keys than one part: every key ends up with its newest record's document, rendered
    /// after collapsing, and the older records' documents are never built.
    #[tokio::test]
    async fn a_refresh_batch_goes_out_in_parts_with_the_newest_documents() {
        let keys = 2 * MIN_PART + 50;
        let inv = invalidator(InvalidationMode::Refresh);
        let event = refresh_batch(keys);
        let newest: Vec<String> = event["Records"].as_array().unwrap()[keys..]
            .iter()
            .map(|r| {
                Document::from_image(&r["dynamodb"]["NewImage"])
                    .unwrap()
                    .into_string()
            })
            .collect();
        let r = inv.handle(event).await;
        assert!(r.batch_item_failures.is_empty(), "{r:?}");
        assert_eq!(
            inv.cache.calls.load(Ordering::SeqCst),
            PARTS,
            "one apply per part"
        );
        for (k, want) in newest.iter().enumerate() {
            assert_eq!(
                inv.cache.value(&format!("product:k{k}")).as_ref(),
                Some(want),
                "k{k}"
            );
        }
    }

    /// A failure in a later part names that part's earliest record, counted in the whole
    /// batch: the parts' indexes are shifted back into the batch's.
    #[tokio::test]
    async fn a_failed_part_names_its_earliest_record_in_the_batch() {
        let keys = 2 * MIN_PART + 50;
        let failed = [MIN_PART + 7, 2 * MIN_PART + 3];
        let inv = invalidator(InvalidationMode::Refresh);
        *inv.cache.fail_keys.lock().unwrap() =
            failed.iter().map(|k| format!("product:k{k}")).collect();
        let r = inv.handle(refresh_batch(keys)).await;
        assert_eq!(r.batch_item_failures.len(), 1);
        // Key k<n>'s first record is record n, sequence number 1000 + n.
        assert_eq!(
            r.batch_item_failures[0].item_identifier.as_deref(),
            Some((1000 + failed[0]).to_string().as_str())
        );
        // The parts before it landed.
        assert!(inv.cache.value("product:k0").is_some());
        assert!(inv.cache.value("product:k199").is_some());
    }

    /// A new image with no JSON form deletes at its record's position: the key's document goes,
    /// and a replay of an older record is still refused.
    #[tokio::test]
    async fn an_image_with_no_json_form_deletes_at_its_position() {
        let inv = invalidator(InvalidationMode::Refresh);
        let mut event = batch(&[("a", Some(10)), ("a", Some(11))]);
        event["Records"][1]["dynamodb"]["NewImage"]["price"] = serde_json::json!({ "X": "1" });
        assert!(inv.handle(event).await.batch_item_failures.is_empty());
        assert_eq!(inv.cache.value("product:a"), None);
        assert_eq!(
            inv.cache.versions.lock().unwrap()["product:a"],
            Order::sequence("11").unwrap()
        );
        // The older record again, alone: refused, nothing cached.
        assert!(inv
            .handle(batch(&[("a", Some(10))]))
            .await
            .batch_item_failures
            .is_empty());
        assert_eq!(inv.cache.value("product:a"), None);
    }

    #[tokio::test]
    async fn a_partial_failure_names_the_earliest_record_not_known_applied() {
        let records = [
            ("a", Some(1)),
            ("b", Some(2)),
            ("a", Some(3)),
            ("c", Some(4)),
            ("b", Some(5)),
        ];
        let failing = |keys: &[&str]| {
            let inv = invalidator(InvalidationMode::Delete);
            *inv.cache.fail_keys.lock().unwrap() =
                keys.iter().map(|k| format!("product:{k}")).collect();
            inv
        };
        let reported = |inv: Invalidator<MemoryCache>, event: Value| async move {
            let r = inv.handle(event).await;
            assert!(r.batch_item_failures.len() <= 1);
            r.batch_item_failures
                .first()
                .map(|f| f.item_identifier.clone().unwrap())
        };
        // b's first record is the earliest not applied; a (records 0 and 2) landed.
        assert_eq!(
            reported(failing(&["b"]), batch(&records)).await.as_deref(),
            Some("2")
        );
        assert_eq!(
            reported(failing(&["c"]), batch(&records)).await.as_deref(),
            Some("4")
        );
        assert_eq!(
            reported(failing(&["c", "a"]), batch(&records))
                .await
                .as_deref(),
            Some("1")
        );
        assert_eq!(reported(failing(&[]), batch(&records)).await, None);
        // The earliest failed record has no sequence number: name the nearest earlier one, or
        // fail the whole batch (an empty identifier) when there is none.
        let gap = [("a", Some(1)), ("b", None), ("b", Some(3))];
        assert_eq!(
            reported(failing(&["b"]), batch(&gap)).await.as_deref(),
            Some("1")
        );
        let none_before = [("b", None), ("a", Some(2))];
        assert_eq!(
            reported(failing(&["b"]), batch(&none_before))
                .await
                .as_deref(),
            Some("")
        );
    }
}
