//! Planning: what each record of a batch asks of the cache (its key, a delete or a refresh,
//! its position in the item's history), a malformed record costing only itself.

use serde_json::Value;

use super::record::{field, field_of, is_ttl_expiry};
use super::render::Render;
use super::Invalidator;
use crate::cache::{Cache, CacheOp, OpKind, Order};
use crate::config::InvalidationMode;
use crate::id::{KeyType, ProductId};

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

/// Why a record was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("the record has no `{0}` key attribute of type S or N")]
    NoKey(String),
    #[error("the key cannot be a cache key: {0}")]
    UncacheableKey(#[from] crate::id::InvalidId),
}

impl<C: Cache> Invalidator<C> {
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

    pub(super) fn plan_with(&self, records: &[Value], render: Render) -> Vec<Planned> {
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
