//! The cache inspector: compares cached products with the table, the way Uber's Cache Inspector
//! and Meta's Polaris measure a cache's consistency in production instead of trusting it.
//!
//! A run samples product keys from every primary (or takes given ids), reads each cached one's
//! item from the table with a strongly consistent `GetItem`, and renders it exactly as the read
//! path would cache it. A key whose cached value differs is a suspect, not yet a finding: an
//! invalidation may be in flight. After a grace period both sides are read again, and only a
//! key whose cached value and table item are both unchanged, and still differ, counts as
//! inconsistent: a change that settles within the grace period is left out, one that would
//! stick until the TTL is caught. Findings are logged with both sides' positions (never the
//! bodies), counted in the `inspector` metrics, and purged when repair is on.

use std::time::Duration;

use futures::StreamExt as _;

use crate::cache::{RedisCache, NOT_FOUND};
use crate::config::{CacheSettings, ConfigError, InvalidationMode, Source};
use crate::document::Document;
use crate::id::ProductId;
use crate::invalidate::Invalidator;
use crate::metrics::{Metric, MetricsSettings, Recorder, Sink};
use crate::store::{Item, ProductStore, StoreError};

use crate::metrics::inspector as metric;

/// How the inspector runs: `INSPECT_SAMPLE` keys per run (default 200), `INSPECT_GRACE_MS`
/// before a suspect (or a change, for the change monitor) is judged (default 5000: well past
/// the invalidator's usual lag, and short of a scheduled run's timeout), `INSPECT_REPAIR`
/// (`true` purges what it finds), `MONITOR_SHARE` (the share of changed keys the change
/// monitor judges, 0 to 1, default 1: every one), `INVALIDATOR_PARALLELIZATION_FACTOR` (the
/// invalidator's mapping's, default 1; above 1 the monitor cannot read the invalidator's
/// progress from a shard's order).
#[derive(Debug, Clone, PartialEq)]
pub struct InspectSettings {
    pub sample: usize,
    pub grace: Duration,
    pub repair: bool,
    pub change_share: f64,
    /// The invalidator applies each shard's records in order, one batch at a time.
    pub shard_order: bool,
}

impl Default for InspectSettings {
    fn default() -> Self {
        Self {
            sample: 200,
            grace: Duration::from_secs(5),
            repair: false,
            change_share: 1.0,
            shard_order: true,
        }
    }
}

impl InspectSettings {
    pub fn from_source(src: &(impl Source + ?Sized)) -> Result<Self, ConfigError> {
        let d = Self::default();
        let invalid = |name, value: String, reason: &str| ConfigError::Invalid {
            name,
            value,
            reason: reason.into(),
        };
        let sample = match src.get("INSPECT_SAMPLE") {
            None => d.sample,
            Some(v) => v
                .parse()
                .ok()
                .filter(|n| (1..=100_000).contains(n))
                .ok_or_else(|| invalid("INSPECT_SAMPLE", v, "a number of keys, 1 to 100000"))?,
        };
        let grace = match src.get("INSPECT_GRACE_MS") {
            None => d.grace,
            Some(v) => v
                .parse()
                .map(Duration::from_millis)
                .map_err(|_| invalid("INSPECT_GRACE_MS", v, "milliseconds"))?,
        };
        let repair = match src.get("INSPECT_REPAIR").as_deref() {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") => true,
            Some(v) => return Err(invalid("INSPECT_REPAIR", v.into(), "true or false")),
        };
        let change_share = match src.get("MONITOR_SHARE") {
            None => d.change_share,
            Some(v) => v
                .parse()
                .ok()
                .filter(|s: &f64| *s > 0.0 && *s <= 1.0)
                .ok_or_else(|| {
                    invalid(
                        "MONITOR_SHARE",
                        v,
                        "a share of the changed keys, above 0 and at most 1",
                    )
                })?,
        };
        let shard_order = match src.get("INVALIDATOR_PARALLELIZATION_FACTOR") {
            None => d.shard_order,
            Some(v) => match v.parse::<u8>() {
                Ok(1) => true,
                Ok(2..=10) => false,
                _ => {
                    return Err(invalid(
                        "INVALIDATOR_PARALLELIZATION_FACTOR",
                        v,
                        "the invalidator mapping's ParallelizationFactor, 1 to 10",
                    ))
                }
            },
        };
        Ok(Self {
            sample,
            grace,
            repair,
            change_share,
            shard_order,
        })
    }
}

/// What to look at.
#[derive(Debug, Clone)]
pub enum Target {
    /// A random sample of this many cached keys, from every primary.
    Sample(usize),
    /// These product ids, cached or not.
    Ids(Vec<String>),
}

/// What a key turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The cache holds what the table holds.
    Consistent,
    /// Nothing cached (given ids only; a sampled key that vanished is `Settled`).
    NotCached,
    /// Differed, then changed during the grace period: a change in flight.
    Settled,
    /// Differed, and still did after the grace period with neither side changed.
    Inconsistent,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Consistent => "consistent",
            Verdict::NotCached => "not cached",
            Verdict::Settled => "settled",
            Verdict::Inconsistent => "INCONSISTENT",
        }
    }
}

/// One key, both sides.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: String,
    pub id: String,
    /// The cached value (a JSON document, or `null` for "not found").
    pub cached: Option<String>,
    /// What the read path would cache for the table's item now.
    pub table: Option<String>,
    /// The key's recorded position (`{key}:ver`), if any.
    pub cached_position: Option<String>,
    /// The item's version attribute, when one is configured.
    pub table_version: Option<String>,
    pub verdict: Verdict,
}

/// A run's outcome.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// How many inconsistent keys were purged.
    pub repaired: usize,
}

impl Report {
    pub fn count(&self, verdict: Verdict) -> usize {
        self.rows.iter().filter(|r| r.verdict == verdict).count()
    }

    /// Keys that were compared (those with a cached value).
    pub fn checked(&self) -> usize {
        self.rows.len() - self.count(Verdict::NotCached)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("reading the cache failed")]
    Cache(#[from] crate::cache::CacheError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    InvalidId(#[from] crate::id::InvalidId),
}

/// Compares the cache with the table. Built once, like the functions' state.
pub struct Inspector<S> {
    pub(crate) cache: RedisCache,
    pub(crate) store: S,
    pub(crate) settings: CacheSettings,
    pub(crate) inspect: InspectSettings,
    /// The sample's metrics, and the change monitor's: each line carries one path's only, so
    /// a `KeysChecked` data point means a scheduled run happened (the heartbeat alarm's
    /// signal), never a stream batch.
    pub(crate) metrics: Recorder,
    pub(crate) change_metrics: Recorder,
    /// Reads stream records as the invalidator does, in refresh mode whatever the deployed
    /// one: the change monitor needs what each change made the item.
    pub(crate) planner: Invalidator<RedisCache>,
}

impl<S: ProductStore> Inspector<S> {
    pub fn new(
        cache: RedisCache,
        store: S,
        settings: CacheSettings,
        inspect: InspectSettings,
    ) -> Self {
        Self {
            planner: Invalidator::new(cache.clone(), InvalidationMode::Refresh, settings.clone()),
            cache,
            store,
            settings,
            inspect,
            metrics: Recorder::off("inspector", &crate::metrics::inspector::ALL),
            change_metrics: Recorder::off("inspector", &crate::metrics::monitor::ALL),
        }
    }

    pub fn with_metrics(mut self, settings: MetricsSettings, sink: Sink) -> Self {
        self.metrics.set_sink(settings.clone(), sink.clone());
        self.change_metrics.set_sink(settings, sink);
        self
    }

    /// The inspector function's invocation: a DynamoDB stream batch (`{"Records": [...]}`,
    /// from its event source mapping) is checked change by change; `{"ids": [...]}` inspects
    /// those ids; a scheduled event (or anything else) inspects a sample of the configured
    /// size. Answers a summary.
    pub async fn handle(
        &self,
        event: serde_json::Value,
    ) -> Result<serde_json::Value, InspectError> {
        if let Some(records) = event.get("Records").and_then(serde_json::Value::as_array) {
            let report = self.check_changes(records).await;
            let inconsistent: Vec<&str> = report.inconsistent().collect();
            return Ok(serde_json::json!({
                "changes": report.rows.len(),
                "inconsistent": inconsistent,
                "pending": report.pending(),
                "unchecked": report.unchecked,
                "repaired": report.repaired,
            }));
        }
        let target = match event.get("ids").and_then(serde_json::Value::as_array) {
            Some(ids) => Target::Ids(
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .collect(),
            ),
            None => Target::Sample(self.inspect.sample),
        };
        let report = self.run(target).await?;
        let inconsistent: Vec<&str> = report
            .rows
            .iter()
            .filter(|r| r.verdict == Verdict::Inconsistent)
            .map(|r| r.key.as_str())
            .collect();
        Ok(serde_json::json!({
            "checked": report.checked(),
            "inconsistent": inconsistent,
            "settled": report.count(Verdict::Settled),
            "repaired": report.repaired,
        }))
    }

    /// One run over `target`; purges the inconsistent keys when repair is on.
    pub async fn run(&self, target: Target) -> Result<Report, InspectError> {
        let prefix = &self.settings.key_prefix;
        let (keys, ids, sampled) = match target {
            Target::Sample(n) => {
                // A key under the prefix that names no valid id (another writer's, or a
                // numeric table's stray) is not ours to judge: left out, not a failed run.
                let (keys, ids): (Vec<String>, Vec<String>) = self
                    .cache
                    .sample_keys(prefix, n)
                    .await?
                    .into_iter()
                    .map(|k| {
                        let id = k[prefix.len()..].to_owned();
                        (k, id)
                    })
                    .filter(|(_, id)| ProductId::parse(id, self.settings.key_type).is_ok())
                    .unzip();
                (keys, ids, true)
            }
            Target::Ids(ids) => {
                let keys = ids
                    .iter()
                    .map(|id| {
                        ProductId::parse(id, self.settings.key_type).map(|id| id.cache_key(prefix))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                (keys, ids, false)
            }
        };
        let first = self.look(&keys, &ids).await?;
        let suspects: Vec<usize> = (0..keys.len())
            .filter(|&i| first[i].cached.is_some() && first[i].cached != first[i].table)
            .collect();
        let mut rows: Vec<Row> = keys
            .iter()
            .zip(&ids)
            .zip(first)
            .map(|((key, id), side)| Row {
                key: key.clone(),
                id: id.clone(),
                verdict: match &side.cached {
                    None if sampled => Verdict::Settled,
                    None => Verdict::NotCached,
                    Some(_) => Verdict::Consistent,
                },
                cached: side.cached,
                table: side.table,
                cached_position: side.position,
                table_version: side.version,
            })
            .collect();

        if !suspects.is_empty() {
            tokio::time::sleep(self.inspect.grace).await;
            let again_keys: Vec<String> = suspects.iter().map(|&i| keys[i].clone()).collect();
            let again_ids: Vec<String> = suspects.iter().map(|&i| ids[i].clone()).collect();
            let again = self.look(&again_keys, &again_ids).await?;
            for (&i, side) in suspects.iter().zip(again) {
                let row = &mut rows[i];
                let unchanged = side.cached == row.cached && side.table == row.table;
                row.verdict = if unchanged {
                    Verdict::Inconsistent
                } else {
                    Verdict::Settled
                };
            }
        }

        let inconsistent: Vec<String> = rows
            .iter()
            .filter(|r| r.verdict == Verdict::Inconsistent)
            .map(|r| r.key.clone())
            .collect();
        for row in rows.iter().filter(|r| r.verdict == Verdict::Inconsistent) {
            // Positions and sizes, never the bodies: they are the customer's data.
            tracing::warn!(
                key = row.key,
                cached_position = row.cached_position,
                table_version = row.table_version,
                cached_bytes = row.cached.as_ref().map(String::len),
                table_bytes = row.table.as_ref().map(String::len),
                repair = self.inspect.repair,
                "cached value differs from the table past the grace period"
            );
        }
        let repaired = if self.inspect.repair {
            self.cache.purge(&inconsistent).await?;
            inconsistent.len()
        } else {
            0
        };
        let report = Report { rows, repaired };
        let add = |m: Metric, n: usize| self.metrics.add(m, n as u64);
        add(metric::KEYS_CHECKED, report.checked());
        add(
            metric::INCONSISTENT_KEYS,
            report.count(Verdict::Inconsistent),
        );
        add(metric::KEYS_SETTLED, report.count(Verdict::Settled));
        add(metric::KEYS_REPAIRED, report.repaired);
        // An all-clear run still says so: the alarm needs a 0, not a missing data point.
        self.metrics.flush_always();
        tracing::info!(
            checked = report.checked(),
            inconsistent = inconsistent.len(),
            settled = report.count(Verdict::Settled),
            repaired = report.repaired,
            "inspection done"
        );
        Ok(report)
    }

    /// Both sides of each key now: the cached value and position, and what the read path
    /// would cache for the table's item. The table is read only for keys with a cached value,
    /// and for given ids.
    async fn look(&self, keys: &[String], ids: &[String]) -> Result<Vec<Side>, InspectError> {
        let cached = self.cache.values(keys).await?;
        let ids = ids
            .iter()
            .map(|id| ProductId::parse(id, self.settings.key_type))
            .collect::<Result<Vec<_>, _>>()?;
        // Owned ids, one future each: a closure over borrowed ones trips rustc's `Send` check
        // for the spawned task that runs this (rust-lang/rust#102211).
        let store = &self.store;
        let reads = futures::stream::iter(
            ids.into_iter()
                .map(|id| async move { store.get(&id).await }),
        )
        .buffered(16)
        .collect::<Vec<_>>()
        .await;
        cached
            .into_iter()
            .zip(reads)
            .map(|((value, position), item)| {
                let item = item?;
                Ok(Side {
                    table: Some(self.cached_form(item.as_ref())),
                    version: item.as_ref().and_then(|i| self.version_of(i)),
                    cached: value,
                    position,
                })
            })
            .collect()
    }

    /// The value the read path would cache for `item`.
    pub(crate) fn cached_form(&self, item: Option<&Item>) -> String {
        match item.map(Document::from_item) {
            Some(Ok(doc)) => doc.into_string(),
            // No JSON form: the read path answers 500 and caches nothing; nothing cached can
            // match it.
            Some(Err(e)) => format!("<no JSON form: {e}>"),
            None => NOT_FOUND.to_owned(),
        }
    }

    fn version_of(&self, item: &Item) -> Option<String> {
        match item.get(self.settings.version_attribute.as_ref()?)? {
            serde_dynamo::AttributeValue::N(n) => Some(n.clone()),
            _ => None,
        }
    }
}

struct Side {
    cached: Option<String>,
    position: Option<String>,
    table: Option<String>,
    version: Option<String>,
}
