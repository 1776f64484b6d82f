//! The invalidator: turns a batch of DynamoDB stream records into cache deletes or refreshes.
//!
//! Records are read one by one from the raw event, so a record that does not match the
//! documented shape costs only itself: its key is still looked for, and if none can be found it
//! is logged and skipped rather than failing the batch and blocking the shard behind it.

use aws_lambda_events::dynamodb::EventRecord;
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_dynamo::AttributeValue;
use serde_json::Value;

use crate::cache::{Cache, CacheOp};
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
                Ok(record) => self.plan_record(&record),
                Err(e) => {
                    // Not the documented shape. Deleting the key it names is right whatever the
                    // change was, so look for the key before giving up on the record.
                    tracing::warn!(index, ?sequence_number, error = %e, "malformed stream record; deleting its key if it has one");
                    self.key_of_raw(raw)
                        .map(|key| CacheOp::Delete { key })
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

    fn plan_record(&self, record: &EventRecord) -> Result<CacheOp, SkipReason> {
        let key = self.key_of(&record.change.keys)?;
        let removed = record.event_name == "REMOVE";
        if removed || self.mode == InvalidationMode::Delete {
            if removed && is_ttl_expiry(record) {
                tracing::debug!(key, "item expired by TTL");
            }
            return Ok(CacheOp::Delete { key });
        }
        if record.event_name != "INSERT" && record.event_name != "MODIFY" {
            tracing::warn!(event_name = %record.event_name, key, "unknown event name; deleting");
            return Ok(CacheOp::Delete { key });
        }
        if record.change.new_image.is_empty() {
            // KEYS_ONLY or OLD_IMAGE streams carry no new version to write.
            return Ok(CacheOp::Delete { key });
        }
        match Document::from_item(&record.change.new_image) {
            Ok(doc) => Ok(CacheOp::Set {
                key,
                value: doc.into_string(),
                ttl: self.settings.ttl,
            }),
            Err(e) => {
                tracing::warn!(error = %e, key, "new image has no JSON form; deleting instead");
                Ok(CacheOp::Delete { key })
            }
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
    record.user_identity.as_ref().is_some_and(|u| {
        u.type_ == "Service" && u.principal_id == "dynamodb.amazonaws.com"
    })
}
