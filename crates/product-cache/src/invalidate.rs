//! The invalidator: turns a batch of DynamoDB stream records into cache deletes or refreshes.
//!
//! Records are read one by one from the raw event, so a record that does not match the
//! documented shape costs only itself: its key is still looked for, and if none can be found it
//! is logged and skipped rather than failing the batch and blocking the shard behind it.

use aws_lambda_events::dynamodb::EventRecord;
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_dynamo::AttributeValue;
use serde_json::Value;

use crate::cache::{Cache, CacheOp, OpKind, Order};
use crate::config::{CacheSettings, InvalidationMode};
use crate::document::Document;
use crate::id::{KeyType, ProductId};

/// Commands per pipeline. Bounds one round trip's size; a failure retries from the first record
/// of the failed chunk, so smaller chunks also mean less work repeated.
const CHUNK: usize = 1000;

/// What one record asks of the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The record's `SequenceNumber`, reported back if its chunk fails.
    pub sequence_number: Option<String>,
    pub op: CacheOp,
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
}

impl<C: Cache> Invalidator<C> {
    pub fn new(cache: C, mode: InvalidationMode, settings: CacheSettings) -> Self {
        Self {
            cache,
            mode,
            settings,
        }
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
        let plan = self.plan(records);
        let mut response = DynamoDbEventResponse::default();
        for chunk in plan.chunks(CHUNK) {
            let ops: Vec<CacheOp> = chunk.iter().map(|p| p.op.clone()).collect();
            // Unordered ops and leases are per key; a refused (older) op is not a failure.
            if let Err(e) = self.cache.apply(&ops).await {
                // Lambda retries from the lowest reported sequence number, so reporting the
                // chunk's first record replays it and everything after it. Every op is
                // idempotent, so what already landed can be applied again safely.
                let first = chunk.iter().find_map(|p| p.sequence_number.clone());
                tracing::error!(error = %e, retry_from = ?first, "cache update failed");
                let mut failure = DynamoDbBatchItemFailure::default();
                // With no sequence number to name, an empty identifier fails the whole batch,
                // which is the safe way to ask for a retry.
                failure.item_identifier = Some(first.unwrap_or_default());
                response.batch_item_failures.push(failure);
                break;
            }
        }
        tracing::info!(
            records = records.len(),
            ops = plan.len(),
            failed = !response.batch_item_failures.is_empty(),
            "batch handled"
        );
        response
    }

    /// The cache operations for a batch, in record order, skipping records that name no product.
    pub fn plan(&self, records: &[Value]) -> Vec<Planned> {
        let mut plan = Vec::with_capacity(records.len());
        for (index, raw) in records.iter().enumerate() {
            let sequence_number = raw
                .pointer("/dynamodb/SequenceNumber")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let result = match serde_json::from_value::<EventRecord>(raw.clone()) {
                Ok(record) => self.plan_record(&record, sequence_number.as_deref()),
                Err(e) => {
                    // Not the documented shape. Deleting the key it names is right whatever the
                    // change was, so look for the key before giving up on the record.
                    tracing::warn!(index, ?sequence_number, error = %e, "malformed stream record; deleting its key if it has one");
                    self.key_of_raw(raw).map(CacheOp::delete)
                }
            };
            match result {
                Ok(op) => plan.push(Planned {
                    sequence_number,
                    op,
                }),
                Err(reason) => {
                    tracing::error!(index, ?sequence_number, %reason, record = %raw, "skipping stream record");
                }
            }
        }
        plan
    }

    fn plan_record(
        &self,
        record: &EventRecord,
        sequence_number: Option<&str>,
    ) -> Result<CacheOp, SkipReason> {
        let key = self.key_of(&record.change.keys)?;
        let removed = record.event_name == "REMOVE";
        if removed && is_ttl_expiry(record) {
            tracing::debug!(key, "item expired by TTL");
        }
        if !removed && record.event_name != "INSERT" && record.event_name != "MODIFY" {
            tracing::warn!(event_name = %record.event_name, key, "unknown event name; deleting");
            return Ok(CacheOp::delete(key));
        }
        let order = self.order_of(record, removed, sequence_number);
        // KEYS_ONLY or OLD_IMAGE streams carry no new version to write, and a write that
        // cannot be ordered could overwrite a newer one: both become deletes.
        let refresh = !removed
            && self.mode == InvalidationMode::Refresh
            && order.is_some()
            && !record.change.new_image.is_empty();
        if !refresh {
            return Ok(CacheOp {
                key,
                kind: OpKind::Delete,
                order,
                created_ms: None,
            });
        }
        // A missing timestamp deserialises as the epoch: the op then deletes, which is safe.
        let created_ms = record
            .change
            .approximate_creation_date_time
            .timestamp_millis()
            - self.settings.clock_margin.as_millis() as i64;
        match Document::from_item(&record.change.new_image) {
            Ok(doc) => Ok(CacheOp {
                key,
                kind: OpKind::Set {
                    value: doc.into_string(),
                    ttl: self.settings.ttl,
                },
                order,
                created_ms: Some(created_ms),
            }),
            Err(e) => {
                tracing::warn!(error = %e, key, "new image has no JSON form; deleting instead");
                Ok(CacheOp::delete(key))
            }
        }
    }

    /// Where the record stands in its item's history: its sequence number, or with a version
    /// attribute configured, the version of the image it leaves behind (a REMOVE ranks just
    /// after the write of the version it removes). `None` when the record does not say, which
    /// makes the op an unordered delete.
    fn order_of(
        &self,
        record: &EventRecord,
        removed: bool,
        sequence_number: Option<&str>,
    ) -> Option<Order> {
        let Some(attr) = &self.settings.version_attribute else {
            return Order::new(sequence_number?, 0);
        };
        let image = if removed {
            &record.change.old_image
        } else {
            &record.change.new_image
        };
        match image.get(attr) {
            Some(AttributeValue::N(n)) => Order::new(n, u8::from(removed)),
            _ => None,
        }
    }

    fn key_of(&self, keys: &serde_dynamo::Item) -> Result<String, SkipReason> {
        let (raw, key_type) = match keys.get(&self.settings.key_attribute) {
            Some(AttributeValue::S(s)) => (s, KeyType::S),
            Some(AttributeValue::N(n)) => (n, KeyType::N),
            _ => return Err(SkipReason::NoKey(self.settings.key_attribute.clone())),
        };
        let id = ProductId::parse(raw, key_type)?;
        Ok(id.cache_key(&self.settings.key_prefix))
    }

    /// The key of a record that does not deserialise: `Keys` first, then either image.
    fn key_of_raw(&self, raw: &Value) -> Result<String, SkipReason> {
        let mut reason = SkipReason::NoKey(self.settings.key_attribute.clone());
        for field in ["Keys", "NewImage", "OldImage"] {
            let Some(map) = raw.pointer(&format!("/dynamodb/{field}")) else {
                continue;
            };
            let Some(attr) = map.get(&self.settings.key_attribute) else {
                continue;
            };
            let Ok(attr) = serde_json::from_value::<AttributeValue>(attr.clone()) else {
                continue;
            };
            let keys = serde_dynamo::Item::from(
                [(self.settings.key_attribute.clone(), attr)]
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            );
            match self.key_of(&keys) {
                Ok(key) => return Ok(key),
                Err(e) => reason = e,
            }
        }
        Err(reason)
    }
}

/// A REMOVE made by DynamoDB's TTL process rather than by a user.
pub fn is_ttl_expiry(record: &EventRecord) -> bool {
    record
        .user_identity
        .as_ref()
        .is_some_and(|u| u.type_ == "Service" && u.principal_id == "dynamodb.amazonaws.com")
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

    fn invalidator(mode: InvalidationMode) -> Invalidator<MemoryCache> {
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
            .map(|r| Order::new(r["dynamodb"]["SequenceNumber"].as_str().unwrap(), 0))
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
        assert_eq!(planned[0].op.order, Order::new("7", 0));

        // A REMOVE ranks just after the write of the version it removes.
        let mut event = fixture("remove.json");
        event["Records"][0]["dynamodb"]["OldImage"]["version"] = serde_json::json!({"N": "7"});
        let planned = inv.plan(event["Records"].as_array().unwrap());
        assert_eq!(planned[0].op.order, Order::new("7", 1));

        // No version in the record: an unordered delete, never an unordered write.
        let planned = inv.plan(fixture("modify.json")["Records"].as_array().unwrap());
        assert_eq!(planned[0].op, CacheOp::delete("product:kb-001"));
    }

    #[test]
    fn ttl_expiry_is_recognised() {
        let event = fixture("ttl-expiry-remove.json");
        let record: EventRecord = serde_json::from_value(event["Records"][0].clone()).unwrap();
        assert!(is_ttl_expiry(&record));
        let event = fixture("remove.json");
        let record: EventRecord = serde_json::from_value(event["Records"][0].clone()).unwrap();
        assert!(!is_ttl_expiry(&record));
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
    async fn a_cache_failure_reports_the_first_record_of_the_failed_chunk() {
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

    #[tokio::test]
    async fn large_batches_are_chunked_and_retried_from_the_failed_chunk() {
        use crate::cache::{CacheError, Fill, Probe};
        struct FailSecondApply(MemoryCache, std::sync::atomic::AtomicUsize);
        impl Cache for FailSecondApply {
            async fn probe(
                &self,
                k: &str,
                t: &str,
                l: std::time::Duration,
            ) -> Result<Probe, CacheError> {
                self.0.probe(k, t, l).await
            }
            async fn fill(&self, f: Fill<'_>) -> Result<bool, CacheError> {
                self.0.fill(f).await
            }
            async fn apply(&self, ops: &[CacheOp]) -> Result<(), CacheError> {
                if self.1.fetch_add(1, Ordering::SeqCst) == 1 {
                    return Err(CacheError::Timeout(Default::default()));
                }
                self.0.apply(ops).await
            }
        }
        let inv = Invalidator::new(
            FailSecondApply(MemoryCache::default(), Default::default()),
            InvalidationMode::Delete,
            CacheSettings::default(),
        );
        let template = fixture("modify.json")["Records"][0].clone();
        let records: Vec<Value> = (0..2500)
            .map(|i| {
                let mut r = template.clone();
                r["dynamodb"]["Keys"]["productId"] = serde_json::json!({"S": format!("p{i}")});
                r["dynamodb"]["SequenceNumber"] = serde_json::json!(format!("{}", 1000 + i));
                r
            })
            .collect();
        let resp = inv.handle(serde_json::json!({ "Records": records })).await;
        // Chunk 1 (records 0..1000) landed, chunk 2 failed: retry from record 1000, stop there.
        assert_eq!(
            resp.batch_item_failures[0].item_identifier.as_deref(),
            Some("2000")
        );
        assert_eq!(inv.cache.1.load(Ordering::SeqCst), 2);
    }
}
