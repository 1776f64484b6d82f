//! The invalidator: turns a batch of DynamoDB stream records into cache deletes or refreshes.
//!
//! Records are read one by one from the raw event, so a record that does not match the
//! documented shape costs only itself: its key is still looked for, and if none can be found it
//! is logged and skipped rather than failing the batch and blocking the shard behind it.
//!
//! - this file: [`Invalidator`] and [`Invalidator::handle`], a batch from event to response.
//! - `plan.rs`: what each record asks of the cache ([`Planned`]).
//! - `collapse.rs`: one op a key, the newest.
//! - `render.rs`: a refresh's document from the record's new image.
//! - `parts.rs`: applying the ops in parts, each rendered just before it goes out.
//! - `count.rs`: the batch's metrics.
//! - `record.rs`: a record's fields, read in place.

use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_json::Value;

mod collapse;
mod count;
mod parts;
mod plan;
mod record;
mod render;

pub use collapse::{collapse, Collapsed};
pub use plan::{Planned, SkipReason};
pub use record::is_ttl_expiry;

use crate::cache::Cache;
use crate::config::{CacheSettings, InvalidationMode};
use crate::metrics::{self, MetricsSettings, Recorder, Sink};
use record::sequence_number_of;
use render::Render;

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
}

#[cfg(test)]
mod tests {
    use super::parts::{MIN_PART, PARTS};
    use super::*;
    use crate::cache::memory::MemoryCache;
    use crate::cache::{CacheOp, OpKind, Order};
    use crate::document::Document;
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
