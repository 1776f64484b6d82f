//! A local stand-in for Lambda's DynamoDB event source mapping: reads every shard of a table's
//! stream in order and hands batches to a function with the same event JSON, retry, bisect,
//! record-age and on-failure behaviour as the deployed mapping, so local runs exercise the same
//! failure handling as production. (One file of over 500 lines on purpose: the rules below act
//! on one per-shard state, and split apart they would no longer read as the one contract.)
//!
//! What it mirrors (AWS Lambda developer guide, "Using Lambda with DynamoDB"):
//! - shards are read in lineage order: a child shard only after its parent is drained; the
//!   starting position applies to the shards present at start, children start at TRIM_HORIZON;
//! - a batch is sent once it holds `BatchSize` records or `MaximumBatchingWindowInSeconds` has
//!   passed since its first record;
//! - a function error retries the whole batch; a partial batch response retries from the lowest
//!   reported sequence number (an empty or unknown identifier fails the whole batch);
//! - `BisectBatchOnFunctionError` splits a failing batch in two and retries each half;
//! - `MaximumRetryAttempts` and `MaximumRecordAgeInSeconds` bound the retries; what is given up
//!   is written to the on-failure file as the destination queue would receive it.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use product_cache::cache::Cache;
use product_cache::invalidate::Invalidator;
use serde_json::{json, Value};

use crate::stream::{lambda_event, Position, ShardInfo, StreamError, StreamReader};

/// Where reading starts on the shards that exist when the poller starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartingPosition {
    TrimHorizon,
    Latest,
}

impl std::str::FromStr for StartingPosition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "TRIM_HORIZON" => Ok(Self::TrimHorizon),
            "LATEST" => Ok(Self::Latest),
            other => Err(format!("expected TRIM_HORIZON or LATEST, got {other}")),
        }
    }
}

/// The event source mapping's settings, named as in the SAM template.
#[derive(Debug, Clone, PartialEq)]
pub struct EsmConfig {
    pub batch_size: usize,
    pub batching_window: Duration,
    pub bisect_on_error: bool,
    /// `None` retries until the record expires (`-1` in the template).
    pub max_retry_attempts: Option<u32>,
    /// `None` keeps records until the stream trims them (`-1` in the template).
    pub max_record_age: Option<Duration>,
    pub starting_position: StartingPosition,
    /// `FunctionResponseTypes: [ReportBatchItemFailures]`; without it a response is ignored.
    pub report_batch_item_failures: bool,
    /// The on-failure destination, as a file of JSON lines.
    pub on_failure: Option<PathBuf>,
    /// How long to wait after a shard returned nothing. Lambda polls each shard four times a
    /// second.
    pub poll_interval: Duration,
}

impl Default for EsmConfig {
    /// Lambda's own defaults, except that failures are reported per item.
    fn default() -> Self {
        Self {
            batch_size: 100,
            batching_window: Duration::ZERO,
            bisect_on_error: false,
            max_retry_attempts: None,
            max_record_age: None,
            starting_position: StartingPosition::TrimHorizon,
            report_batch_item_failures: true,
            on_failure: None,
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// The function the mapping invokes: its response JSON, or a function error.
pub trait BatchFunction: Send + Sync {
    fn invoke(&self, event: Value) -> impl Future<Output = Result<Value, String>> + Send;
}

impl<C: Cache> BatchFunction for Invalidator<C> {
    async fn invoke(&self, event: Value) -> Result<Value, String> {
        serde_json::to_value(self.handle(event).await).map_err(|e| e.to_string())
    }
}

/// The inspector function on the stream: the change monitor (its handler routes a stream
/// event to [`Inspector::check_changes`](product_cache::inspect::Inspector)).
impl<S: product_cache::store::ProductStore> BatchFunction for product_cache::inspect::Inspector<S> {
    async fn invoke(&self, event: Value) -> Result<Value, String> {
        self.handle(event).await.map_err(|e| e.to_string())
    }
}

/// Any async closure as a function, for tests.
pub struct FnFunction<F>(pub F);

impl<F, Fut> BatchFunction for FnFunction<F>
where
    F: Fn(Value) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Value, String>> + Send,
{
    fn invoke(&self, event: Value) -> impl Future<Output = Result<Value, String>> + Send {
        (self.0)(event)
    }
}

/// Counters for the status line.
#[derive(Debug, Default)]
pub struct PollerStats {
    /// `GetRecords` calls made.
    pub polls: AtomicU64,
    pub records_read: AtomicU64,
    /// Records the function handled successfully (invalidations, for the invalidator).
    pub records_acknowledged: AtomicU64,
    pub invocations: AtomicU64,
    pub function_errors: AtomicU64,
    pub partial_failures: AtomicU64,
    pub records_given_up: AtomicU64,
    /// Age of the newest record handed to the function when it was handed over, in ms.
    pub iterator_age_ms: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("writing the on-failure file {path}")]
    OnFailure {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct ShardState {
    info: ShardInfo,
    /// Present at start: only these shards use the starting position; shards that appear later
    /// are children and are read from their beginning.
    initial: bool,
    iterator: Option<String>,
    started: bool,
    finished: bool,
    last_read: Option<String>,
    buffer: Vec<Value>,
    first_buffered: Option<tokio::time::Instant>,
}

/// Records waiting to be (re)delivered, with the attempts already spent on them.
struct Pending {
    records: Vec<Value>,
    attempts: u32,
}

pub struct Poller<F> {
    reader: StreamReader,
    config: EsmConfig,
    function: F,
    stats: Arc<PollerStats>,
    function_arn: String,
}

impl<F: BatchFunction> Poller<F> {
    pub fn new(reader: StreamReader, config: EsmConfig, function: F) -> Self {
        Self {
            reader,
            config,
            function,
            stats: Arc::default(),
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:invalidator-function"
                .into(),
        }
    }

    pub fn stats(&self) -> Arc<PollerStats> {
        self.stats.clone()
    }

    pub fn function(&self) -> &F {
        &self.function
    }

    /// Polls until `shutdown` resolves. Stream errors are logged and retried, as the mapping
    /// does; only a failure to write the on-failure file stops the poller.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), PollerError> {
        tokio::pin!(shutdown);
        let mut shards: Vec<ShardState> = Vec::new();
        let mut first_discovery = true;
        let mut next_discovery = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_discovery {
                match self.reader.shards().await {
                    Ok(found) => self.discover(&mut shards, found, first_discovery),
                    Err(e) => tracing::warn!(error = %e, "DescribeStream failed; retrying"),
                }
                first_discovery = false;
                next_discovery = tokio::time::Instant::now() + Duration::from_secs(1);
            }
            let mut busy = false;
            for i in 0..shards.len() {
                if shards[i].finished || !parent_done(&shards, &shards[i]) {
                    continue;
                }
                busy |= self.poll_shard(&mut shards[i]).await?;
            }
            if !busy {
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                }
            } else if futures_ready(&mut shutdown).await {
                return Ok(());
            }
        }
    }

    fn discover(&self, shards: &mut Vec<ShardState>, found: Vec<ShardInfo>, initial: bool) {
        for info in found {
            if let Some(known) = shards.iter_mut().find(|s| s.info.shard_id == info.shard_id) {
                known.info.closed = info.closed;
                continue;
            }
            tracing::debug!(shard = %info.shard_id, parent = ?info.parent_shard_id, "new shard");
            shards.push(ShardState {
                info,
                initial,
                iterator: None,
                started: false,
                finished: false,
                last_read: None,
                buffer: Vec::new(),
                first_buffered: None,
            });
        }
    }

    /// Reads from one shard and delivers a batch when one is due. Returns whether anything
    /// happened, so the loop only sleeps when every shard is idle.
    async fn poll_shard(&self, shard: &mut ShardState) -> Result<bool, PollerError> {
        if !shard.started {
            let position = match (&shard.last_read, self.config.starting_position) {
                (Some(seq), _) => Position::After(seq.clone()),
                (None, StartingPosition::Latest) if shard.initial => Position::Latest,
                (None, _) => Position::TrimHorizon,
            };
            match self.reader.iterator(&shard.info.shard_id, &position).await {
                Ok(it) => {
                    shard.iterator = it;
                    shard.started = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, shard = %shard.info.shard_id, "GetShardIterator failed");
                    return Ok(false);
                }
            }
        }
        let mut read_any = false;
        if let Some(it) = shard.iterator.clone() {
            let want = self
                .config
                .batch_size
                .saturating_sub(shard.buffer.len())
                .clamp(1, 1000);
            let result = self.reader.read(&it, want as i32).await;
            self.stats.polls.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok((records, next)) => {
                    read_any = !records.is_empty();
                    if let Some(last) = records.last() {
                        shard.last_read = seq_of(last).map(str::to_owned);
                    }
                    self.stats
                        .records_read
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    if shard.first_buffered.is_none() && read_any {
                        shard.first_buffered = Some(tokio::time::Instant::now());
                    }
                    shard.buffer.extend(records);
                    shard.iterator = next;
                }
                Err(e) => {
                    // Most often an expired iterator: take a new one after the last record read.
                    tracing::warn!(error = %e, shard = %shard.info.shard_id, "GetRecords failed; re-reading from the last record");
                    shard.started = false;
                    return Ok(false);
                }
            }
        }
        let exhausted = shard.iterator.is_none();
        let due = shard.buffer.len() >= self.config.batch_size
            || shard
                .first_buffered
                .is_some_and(|t| t.elapsed() >= self.config.batching_window)
            || (exhausted && !shard.buffer.is_empty());
        if due && !shard.buffer.is_empty() {
            let batch = std::mem::take(&mut shard.buffer);
            shard.first_buffered = None;
            self.deliver(&shard.info.shard_id, batch).await?;
        }
        if exhausted && shard.buffer.is_empty() {
            tracing::debug!(shard = %shard.info.shard_id, "shard closed and drained");
            shard.finished = true;
        }
        Ok(read_any)
    }

    /// Delivers one batch until every record is acknowledged or given up. The shard waits
    /// meanwhile: per-item order is kept by never starting the next batch early.
    async fn deliver(&self, shard_id: &str, batch: Vec<Value>) -> Result<(), PollerError> {
        let mut queue = VecDeque::from([Pending {
            records: batch,
            attempts: 0,
        }]);
        while let Some(mut pending) = queue.pop_front() {
            if let Some(max_age) = self.config.max_record_age {
                let expired = pending
                    .records
                    .iter()
                    .take_while(|r| age_of(r).is_some_and(|a| a > max_age))
                    .count();
                if expired > 0 {
                    let dropped: Vec<Value> = pending.records.drain(..expired).collect();
                    self.give_up(shard_id, &dropped, "RecordAgeExceeded", pending.attempts)?;
                }
            }
            if pending.records.is_empty() {
                continue;
            }
            if let Some(age) = pending.records.last().and_then(age_of) {
                self.stats
                    .iterator_age_ms
                    .store(age.as_millis() as u64, Ordering::Relaxed);
            }
            self.stats.invocations.fetch_add(1, Ordering::Relaxed);
            let event = lambda_event(pending.records.clone());
            let failed_from = match self.function.invoke(event).await {
                Err(e) => {
                    tracing::warn!(error = %e, records = pending.records.len(), "function error");
                    self.stats.function_errors.fetch_add(1, Ordering::Relaxed);
                    Some((0, true))
                }
                Ok(response) if self.config.report_batch_item_failures => {
                    first_failure(&pending.records, &response).map(|i| (i, false))
                }
                Ok(_) => None,
            };
            let Some((index, function_error)) = failed_from else {
                self.acknowledge(pending.records.len());
                continue;
            };
            if !function_error {
                self.stats.partial_failures.fetch_add(1, Ordering::Relaxed);
            }
            // Lambda checkpoints everything before the first failure.
            self.acknowledge(index);
            let remaining: Vec<Value> = pending.records.split_off(index);
            let attempts = pending.attempts + 1;
            if self
                .config
                .max_retry_attempts
                .is_some_and(|max| attempts > max)
            {
                self.give_up(shard_id, &remaining, "RetryAttemptsExhausted", attempts)?;
                continue;
            }
            if self.config.bisect_on_error && remaining.len() > 1 {
                let mut first = remaining;
                let second = first.split_off(first.len() / 2);
                queue.push_front(Pending {
                    records: second,
                    attempts,
                });
                queue.push_front(Pending {
                    records: first,
                    attempts,
                });
            } else {
                queue.push_front(Pending {
                    records: remaining,
                    attempts,
                });
            }
            // A short pause keeps a failing function from spinning the loop.
            tokio::time::sleep(Duration::from_millis(20).min(self.config.poll_interval)).await;
        }
        Ok(())
    }

    fn acknowledge(&self, n: usize) {
        self.stats
            .records_acknowledged
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Writes what the on-failure destination would receive: metadata about the records, not
    /// the records themselves (consumers read them back from the stream by sequence number).
    fn give_up(
        &self,
        shard_id: &str,
        records: &[Value],
        condition: &str,
        attempts: u32,
    ) -> Result<(), PollerError> {
        if records.is_empty() {
            return Ok(());
        }
        self.stats
            .records_given_up
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        tracing::error!(
            condition,
            records = records.len(),
            start = ?seq_of(&records[0]),
            "giving up on records"
        );
        let Some(path) = &self.config.on_failure else {
            return Ok(());
        };
        let arrival = |r: &Value| {
            r["dynamodb"]["ApproximateCreationDateTime"]
                .as_f64()
                .map(rfc3339)
                .unwrap_or_default()
        };
        let message = json!({
            "requestContext": {
                "requestId": format!("{:032x}", fastrand_u128()),
                "functionArn": self.function_arn,
                "condition": condition,
                "approximateInvokeCount": attempts,
            },
            "responseContext": {
                "statusCode": 200,
                "executedVersion": "$LATEST",
                "functionError": "Unhandled",
            },
            "version": "1.0",
            "timestamp": rfc3339(now_secs()),
            "DDBStreamBatchInfo": {
                "shardId": shard_id,
                "startSequenceNumber": seq_of(&records[0]),
                "endSequenceNumber": seq_of(&records[records.len() - 1]),
                "approximateArrivalOfFirstRecord": arrival(&records[0]),
                "approximateArrivalOfLastRecord": arrival(&records[records.len() - 1]),
                "batchSize": records.len(),
                "streamArn": self.reader.stream_arn(),
            },
        });
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            writeln!(file, "{message}")
        };
        write().map_err(|source| PollerError::OnFailure {
            path: path.clone(),
            source,
        })
    }
}

/// Whether `shutdown` has already resolved, without waiting for it.
async fn futures_ready(shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
    tokio::select! {
        biased;
        () = shutdown.as_mut() => true,
        () = std::future::ready(()) => false,
    }
}

fn parent_done(shards: &[ShardState], shard: &ShardState) -> bool {
    match &shard.info.parent_shard_id {
        None => true,
        // A parent the stream no longer lists has been trimmed: nothing left to wait for.
        Some(parent) => shards
            .iter()
            .find(|s| &s.info.shard_id == parent)
            .is_none_or(|p| p.finished),
    }
}

fn seq_of(record: &Value) -> Option<&str> {
    record["dynamodb"]["SequenceNumber"].as_str()
}

/// The index of the first record to retry, per the partial batch response contract: the lowest
/// reported sequence number; an empty, missing or unknown identifier fails the whole batch.
/// `None` acknowledges the whole batch. Public so the consistency checker's feeder, which plays
/// the mapping with injected faults, acknowledges by this same rule.
pub fn first_failure(records: &[Value], response: &Value) -> Option<usize> {
    let failures = response.get("batchItemFailures")?.as_array()?;
    let mut first: Option<usize> = None;
    for failure in failures {
        let index = failure
            .get("itemIdentifier")
            .and_then(Value::as_str)
            .and_then(|id| records.iter().position(|r| seq_of(r) == Some(id)))
            .unwrap_or(0);
        first = Some(first.map_or(index, |f| f.min(index)));
    }
    first
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn age_of(record: &Value) -> Option<Duration> {
    let created = record["dynamodb"]["ApproximateCreationDateTime"].as_f64()?;
    Some(Duration::from_secs_f64((now_secs() - created).max(0.0)))
}

fn rfc3339(epoch_secs: f64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs_f64(epoch_secs.max(0.0));
    humantime::format_rfc3339_millis(t).to_string()
}

fn fastrand_u128() -> u128 {
    fastrand::u128(..)
}
