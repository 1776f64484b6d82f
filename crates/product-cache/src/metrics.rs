//! Metrics in CloudWatch's Embedded Metric Format (EMF): one JSON line per invocation on the
//! function's standard output, which CloudWatch Logs turns into metrics with no API call and no
//! extra latency (a `PutMetricData` per invocation would cost both).
//!
//! Each function owns a [`Recorder`]: the handler counts into it (atomics, so the local stack's
//! concurrent requests can share one) and flushes it when an invocation ends, which writes what
//! was counted since the last flush. Dimensions are the service (`METRICS_SERVICE`, one value
//! per deployment) and the function: low cardinality, so the metric count stays fixed however
//! many products there are. No key, id or item body is ever a dimension or a value.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{ConfigError, Source};

/// The CloudWatch unit of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
        }
    }
}

/// A metric a function emits: its CloudWatch name and unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub unit: Unit,
    /// Emitted as the array of each event's value (for CloudWatch's percentiles), and left out
    /// of a line with no events rather than written as a 0 that would pull them down.
    pub sampled: bool,
}

impl Metric {
    pub const fn count(name: &'static str) -> Metric {
        Metric {
            name,
            unit: Unit::Count,
            sampled: false,
        }
    }

    /// A duration, one value per event.
    pub const fn millis(name: &'static str) -> Metric {
        Metric {
            name,
            unit: Unit::Milliseconds,
            sampled: true,
        }
    }

    /// A size, one value per event (how many products one batch request asked for).
    pub const fn sizes(name: &'static str) -> Metric {
        Metric {
            name,
            unit: Unit::Count,
            sampled: true,
        }
    }
}

/// The read function's metrics, in the order of [`read::ALL`].
pub mod read {
    use super::Metric;

    /// Answered from Redis.
    pub const HITS: Metric = Metric::count("Hits");
    /// Redis had nothing; answered from the table.
    pub const MISSES: Metric = Metric::count("Misses");
    /// Redis failed or timed out; answered from the table without it.
    pub const BYPASSES: Metric = Metric::count("Bypasses");
    /// Of those, the ones that did not even try Redis: the circuit breaker of the key's node
    /// was open (the node had just failed several calls in a row).
    pub const BREAKER_BYPASSES: Metric = Metric::count("BreakerBypasses");
    /// Requests that found another reader's lease and waited for its fill.
    pub const LEASE_WAITS: Metric = Metric::count("LeaseWaits");
    /// Time those requests spent waiting (summed per invocation).
    pub const LEASE_WAIT_TIME: Metric = Metric::millis("LeaseWaitTime");
    /// Fills Redis refused: the key changed since the lease, or the fill was older.
    pub const REFUSED_FILLS: Metric = Metric::count("RefusedFills");
    /// Requests with an id that is not one, or a batch request that is not one (answered 400;
    /// not a cache event).
    pub const INVALID_REQUESTS: Metric = Metric::count("InvalidRequests");
    /// Batch requests (`GET /products?ids=...`) answered. Their products count one by one in
    /// Hits, Misses and Bypasses.
    pub const BATCH_READS: Metric = Metric::count("BatchReads");
    /// How many distinct products each batch request asked for.
    pub const BATCH_SIZE: Metric = Metric::sizes("BatchSize");

    pub const ALL: [Metric; 10] = [
        HITS,
        MISSES,
        BYPASSES,
        BREAKER_BYPASSES,
        LEASE_WAITS,
        LEASE_WAIT_TIME,
        REFUSED_FILLS,
        INVALID_REQUESTS,
        BATCH_READS,
        BATCH_SIZE,
    ];
}

/// The invalidator's metrics, in the order of [`invalidator::ALL`].
pub mod invalidator {
    use super::Metric;

    /// Records in the batch Lambda delivered.
    pub const BATCH_SIZE: Metric = Metric::count("BatchSize");
    /// Records whose change reached Redis (collapsed ones included: their newest covered them).
    pub const RECORDS_APPLIED: Metric = Metric::count("RecordsApplied");
    /// Records Redis refused as older than a change the key had already seen (replays).
    pub const RECORDS_REFUSED_AS_OLDER: Metric = Metric::count("RecordsRefusedAsOlder");
    /// Records that could not be understood; skipped so they never block the shard.
    pub const RECORDS_SKIPPED_MALFORMED: Metric = Metric::count("RecordsSkippedMalformed");
    /// Records handed back to Lambda as failed (Redis failed): they will be retried.
    pub const RECORDS_FAILED: Metric = Metric::count("RecordsFailed");
    /// From a record's creation to its change being applied. An upper bound: DynamoDB Streams
    /// rounds `ApproximateCreationDateTime` down to the second, so each value is the true lag
    /// plus up to one second.
    pub const INVALIDATION_LAG: Metric = Metric::millis("InvalidationLag");
    /// Batches acknowledged with fewer replicas confirming than `REDIS_CONFIRM_REPLICAS`,
    /// because a node they wrote to had fewer attached (a shard after a failover, until its
    /// replacement replica has synced).
    pub const BATCHES_UNDER_REPLICATED: Metric = Metric::count("BatchesUnderReplicated");
    /// Batches whose refreshes were applied as deletes on some node because the eviction guard
    /// could not read its eviction count (the user may not run `INFO`, or the reply lacks
    /// `evicted_keys`): right whatever the records were, but each costs a miss.
    pub const BATCHES_EVICTION_GUARD_BLIND: Metric = Metric::count("BatchesEvictionGuardBlind");

    pub const ALL: [Metric; 8] = [
        BATCH_SIZE,
        RECORDS_APPLIED,
        RECORDS_REFUSED_AS_OLDER,
        RECORDS_SKIPPED_MALFORMED,
        RECORDS_FAILED,
        INVALIDATION_LAG,
        BATCHES_UNDER_REPLICATED,
        BATCHES_EVICTION_GUARD_BLIND,
    ];
}

/// The sampling inspector's metrics (`inspect.rs`).
pub mod inspector {
    use super::Metric;

    /// Cached keys compared with the table.
    pub const KEYS_CHECKED: Metric = Metric::count("KeysChecked");
    /// Keys whose cached value differed from the table and still did after the grace period.
    pub const INCONSISTENT_KEYS: Metric = Metric::count("InconsistentKeys");
    /// Suspects that changed during the grace period (an invalidation or fill in flight).
    pub const KEYS_SETTLED: Metric = Metric::count("KeysSettled");
    /// Inconsistent keys purged (with repair on).
    pub const KEYS_REPAIRED: Metric = Metric::count("KeysRepaired");

    pub const ALL: [Metric; 4] = [KEYS_CHECKED, INCONSISTENT_KEYS, KEYS_SETTLED, KEYS_REPAIRED];
}

/// The change monitor's metrics (`monitor.rs`), beside the sampling inspector's in the
/// `inspector` function's lines, on a recorder of their own.
pub mod monitor {
    use super::Metric;

    /// Changes judged (one per changed key per batch: a key's newest change in it).
    pub const CHANGES_CHECKED: Metric = Metric::count("ChangesChecked");
    /// Changes after which the cache still differed from the item, the invalidator past them.
    pub const CHANGES_INCONSISTENT: Metric = Metric::count("ChangesInconsistent");
    /// Changes the invalidator had not applied a grace period after they were made.
    pub const CHANGES_PENDING: Metric = Metric::count("ChangesPending");
    /// Changes a later one had replaced by the time they were judged.
    pub const CHANGES_SUPERSEDED: Metric = Metric::count("ChangesSuperseded");
    /// Changes that could not be judged (Redis or the table failed): counted, never retried.
    pub const CHANGES_UNCHECKED: Metric = Metric::count("ChangesUnchecked");
    /// How old each pending change was when judged: the invalidator's lag as the cache sees it.
    pub const PENDING_AGE: Metric = Metric::millis("PendingChangeAge");

    pub const ALL: [Metric; 6] = [
        CHANGES_CHECKED,
        CHANGES_INCONSISTENT,
        CHANGES_PENDING,
        CHANGES_SUPERSEDED,
        CHANGES_UNCHECKED,
        PENDING_AGE,
    ];
}

/// EMF allows at most 100 values in one metric's array.
pub const MAX_SAMPLES: usize = 100;

/// Where flushed lines go.
#[derive(Clone)]
pub enum Sink {
    /// Nowhere: the library used directly (tests, the benchmark).
    Off,
    /// Standard output, where Lambda sends it to CloudWatch Logs.
    Stdout,
    /// Kept in memory: the tests, which parse them back.
    Memory(Arc<Mutex<Vec<String>>>),
    /// Appended to a file: the local stack, whose user reads them there.
    File(Arc<Mutex<std::fs::File>>),
}

/// The settings of the metrics: `METRICS_NAMESPACE` (default `ProductCache`; `off` turns the
/// lines off) and `METRICS_SERVICE` (default `product-cache`; the template sets the stack name,
/// so two deployments in one account keep apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    pub namespace: Option<String>,
    pub service: String,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            namespace: Some("ProductCache".into()),
            service: "product-cache".into(),
        }
    }
}

impl MetricsSettings {
    pub fn from_source(src: &(impl Source + ?Sized)) -> Result<Self, ConfigError> {
        let d = Self::default();
        let namespace = match src.get("METRICS_NAMESPACE") {
            None => d.namespace,
            Some(ns) if ns.eq_ignore_ascii_case("off") => None,
            Some(ns) if ns.is_empty() || ns.len() > 255 => {
                return Err(ConfigError::Invalid {
                    name: "METRICS_NAMESPACE",
                    value: ns,
                    reason: "a CloudWatch namespace of 1 to 255 characters, or `off`".into(),
                })
            }
            Some(ns) => Some(ns),
        };
        let service = src.get("METRICS_SERVICE").unwrap_or(d.service);
        if service.is_empty() {
            return Err(ConfigError::Invalid {
                name: "METRICS_SERVICE",
                value: service,
                reason: "must not be empty".into(),
            });
        }
        Ok(Self { namespace, service })
    }
}

/// Counts one function's metrics between flushes.
pub struct Recorder {
    function: &'static str,
    metrics: &'static [Metric],
    values: Box<[AtomicU64]>,
    /// Per-event values of the sampled metrics, for percentiles; at most [`MAX_SAMPLES`].
    samples: Mutex<Vec<(usize, u64)>>,
    settings: MetricsSettings,
    sink: Sink,
}

impl Recorder {
    /// A recorder for `function` (the `Function` dimension) emitting `metrics`.
    pub fn new(
        function: &'static str,
        metrics: &'static [Metric],
        settings: MetricsSettings,
        sink: Sink,
    ) -> Self {
        Self {
            function,
            metrics,
            values: metrics.iter().map(|_| AtomicU64::new(0)).collect(),
            samples: Mutex::new(Vec::new()),
            settings,
            sink,
        }
    }

    /// Counting, but writing nowhere.
    pub fn off(function: &'static str, metrics: &'static [Metric]) -> Self {
        Self::new(function, metrics, MetricsSettings::default(), Sink::Off)
    }

    pub fn set_sink(&mut self, settings: MetricsSettings, sink: Sink) {
        self.settings = settings;
        self.sink = sink;
    }

    fn index(&self, metric: Metric) -> usize {
        self.metrics
            .iter()
            .position(|m| *m == metric)
            .unwrap_or_else(|| panic!("{} is not a {} metric", metric.name, self.function))
    }

    /// Adds `n` to a metric.
    pub fn add(&self, metric: Metric, n: u64) {
        if n > 0 {
            self.values[self.index(metric)].fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn incr(&self, metric: Metric) {
        self.add(metric, 1);
    }

    /// Records one event's value of a sampled metric: emitted as the array of values (for
    /// CloudWatch's percentiles), the first [`MAX_SAMPLES`] since the last flush.
    pub fn sample(&self, metric: Metric, value: u64) {
        let i = self.index(metric);
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.iter().filter(|(m, _)| *m == i).count() < MAX_SAMPLES {
            samples.push((i, value));
        }
    }

    /// What was counted since the last flush, as one EMF line, and zero again. `None` when
    /// nothing was counted.
    pub fn take_line(&self) -> Option<String> {
        self.line(false)
    }

    fn line(&self, even_if_zero: bool) -> Option<String> {
        let values: Vec<u64> = self
            .values
            .iter()
            .map(|v| v.swap(0, Ordering::Relaxed))
            .collect();
        let samples = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        if !even_if_zero && values.iter().all(|v| *v == 0) && samples.is_empty() {
            return None;
        }
        let namespace = self.settings.namespace.as_deref()?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut body = serde_json::Map::new();
        let mut declared = Vec::new();
        for (i, metric) in self.metrics.iter().enumerate() {
            let sampled: Vec<u64> = samples
                .iter()
                .filter(|(m, _)| *m == i)
                .map(|(_, v)| *v)
                .collect();
            let value = if !sampled.is_empty() {
                serde_json::json!(sampled)
            } else {
                serde_json::json!(values[i])
            };
            // A sampled metric with no events says nothing: left out rather than a 0 that would
            // pull its percentiles down.
            if metric.sampled && sampled.is_empty() && values[i] == 0 {
                continue;
            }
            declared.push(serde_json::json!({"Name": metric.name, "Unit": metric.unit.as_str()}));
            body.insert(metric.name.into(), value);
        }
        body.insert(
            "_aws".into(),
            serde_json::json!({
                "Timestamp": timestamp,
                "CloudWatchMetrics": [{
                    "Namespace": namespace,
                    "Dimensions": [["Service", "Function"]],
                    "Metrics": declared,
                }],
            }),
        );
        body.insert("Service".into(), self.settings.service.clone().into());
        body.insert("Function".into(), self.function.into());
        Some(serde_json::Value::Object(body).to_string())
    }

    /// Ends an invocation: writes what was counted to the sink, if anything was.
    pub fn flush(&self) {
        self.write(false);
    }

    /// Writes a line even when every count is zero: for a metric an alarm watches, where a
    /// 0 says "checked, all clear" and a missing point says nothing.
    pub fn flush_always(&self) {
        self.write(true);
    }

    fn write(&self, even_if_zero: bool) {
        if matches!(self.sink, Sink::Off) {
            return;
        }
        let Some(line) = self.line(even_if_zero) else {
            return;
        };
        match &self.sink {
            Sink::Off => {}
            Sink::Stdout => {
                // One write of the whole line under the lock, so it cannot interleave with a log
                // line; a failed write (a closed pipe) must not fail the invocation.
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(format!("{line}\n").as_bytes());
                let _ = out.flush();
            }
            Sink::Memory(lines) => lines.lock().unwrap_or_else(|e| e.into_inner()).push(line),
            Sink::File(file) => {
                let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = file.write_all(format!("{line}\n").as_bytes()) {
                    tracing::warn!(error = %e, "writing the metrics file failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> (Recorder, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let rec = Recorder::new(
            "read",
            &read::ALL,
            MetricsSettings::default(),
            Sink::Memory(lines.clone()),
        );
        (rec, lines)
    }

    #[test]
    fn a_flush_writes_what_was_counted_since_the_last_one() {
        let (rec, lines) = memory();
        rec.incr(read::HITS);
        rec.add(read::HITS, 2);
        rec.incr(read::MISSES);
        rec.flush();
        rec.flush(); // nothing new: no line
        rec.incr(read::BYPASSES);
        rec.flush();
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 2);
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["Hits"], 3);
        assert_eq!(first["Misses"], 1);
        assert_eq!(first["Bypasses"], 0);
        assert_eq!(first["Function"], "read");
        assert_eq!(first["Service"], "product-cache");
        let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["Hits"], 0);
        assert_eq!(second["Bypasses"], 1);
    }

    #[test]
    fn millisecond_metrics_are_arrays_of_at_most_100_values_and_absent_when_unused() {
        let (rec, lines) = memory();
        rec.incr(read::HITS);
        rec.flush();
        for v in 0..150 {
            rec.sample(read::LEASE_WAIT_TIME, v);
        }
        rec.flush();
        let lines = lines.lock().unwrap();
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert!(first.get("LeaseWaitTime").is_none());
        let names: Vec<&str> = first["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert!(!names.contains(&"LeaseWaitTime"));
        let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(
            second["LeaseWaitTime"].as_array().unwrap().len(),
            MAX_SAMPLES
        );
    }

    #[test]
    fn the_namespace_can_be_turned_off_and_is_validated() {
        let off = MetricsSettings::from_source(&[("METRICS_NAMESPACE", "off")][..]).unwrap();
        assert_eq!(off.namespace, None);
        let (mut rec, lines) = memory();
        rec.set_sink(off, Sink::Memory(lines.clone()));
        rec.incr(read::HITS);
        rec.flush();
        assert!(lines.lock().unwrap().is_empty());
        assert!(MetricsSettings::from_source(&[("METRICS_NAMESPACE", "")][..]).is_err());
        let custom = MetricsSettings::from_source(
            &[("METRICS_NAMESPACE", "Shop"), ("METRICS_SERVICE", "prod")][..],
        )
        .unwrap();
        assert_eq!(custom.namespace.as_deref(), Some("Shop"));
        assert_eq!(custom.service, "prod");
    }
}
