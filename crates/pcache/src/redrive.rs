//! Redrive: applies again what the invalidator's event source mapping gave up on.
//!
//! When a batch keeps failing, Lambda sends an on-failure record to the mapping's destination
//! (an SQS queue in the template; the local stack writes the same records to a file). The record
//! names a shard and a sequence-number range, not the items, and the stream keeps records for
//! 24 hours. So a redrive reads each failed range from the stream again and applies it through
//! the invalidator's own code (`Invalidator::handle`: the same ordering, leases and epochs as
//! the function). A range already past the stream's retention cannot be read: if the record
//! carries the batch itself (an S3 on-failure destination keeps the payload), the keys it names
//! are purged; if not, the range is reported as unrecoverable, and the items it touched may be
//! served stale until their TTL unless purged (`pcache inspect --sample`, `pcache purge`).
//!
//! A record is removed from its destination only once its range was applied (or purged).

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_sqs::config::timeout::TimeoutConfig;

use product_cache::cache::RedisCache;
use product_cache::invalidate::Invalidator;
use serde_json::Value;

use local_stack::stream::{lambda_event, Position, StreamReader};

use crate::pages::{is_trimmed, PagesEnd, ShardPages};

/// The stream keeps records this long.
pub const RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("not an on-failure record of a DynamoDB stream mapping (no DDBStreamBatchInfo.{0})")]
    NotAFailureRecord(&'static str),
    #[error("reading {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}, line {line}: not JSON")]
    Json {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("SQS {operation} on {queue_url} failed")]
    Sqs {
        operation: &'static str,
        queue_url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("SQS {operation} of message {message_id} on {queue_url} failed")]
    SqsMessage {
        operation: &'static str,
        message_id: String,
        queue_url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One failed batch, as its on-failure record describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedBatch {
    pub stream_arn: String,
    pub shard_id: String,
    pub start: String,
    pub end: String,
    pub batch_size: usize,
    /// When the last record of the range reached the stream (RFC 3339), if said.
    pub last_arrival: Option<String>,
    /// The batch's records, when the destination kept them (S3 keeps the payload; SQS and SNS
    /// records carry only the range).
    pub records: Option<Vec<Value>>,
}

impl FailedBatch {
    /// Reads Lambda's on-failure record for a DynamoDB stream mapping.
    pub fn parse(record: &Value) -> Result<Self, RedriveError> {
        let info = &record["DDBStreamBatchInfo"];
        let field = |name: &'static str| {
            info[name]
                .as_str()
                .map(str::to_owned)
                .ok_or(RedriveError::NotAFailureRecord(name))
        };
        // The payload, when kept, is the invocation's event: as an object, or as a string of it.
        let payload = match &record["payload"] {
            Value::String(s) => serde_json::from_str(s).ok(),
            Value::Object(_) => Some(record["payload"].clone()),
            _ => None,
        };
        Ok(Self {
            stream_arn: field("streamArn")?,
            shard_id: field("shardId")?,
            start: field("startSequenceNumber")?,
            end: field("endSequenceNumber")?,
            batch_size: info["batchSize"].as_u64().unwrap_or(0) as usize,
            last_arrival: info["approximateArrivalOfLastRecord"]
                .as_str()
                .map(str::to_owned),
            records: payload
                .and_then(|p: Value| p.get("Records").and_then(Value::as_array).cloned()),
        })
    }

    /// Whether the range is older than the stream keeps records, by its last record's arrival.
    pub fn past_retention(&self, now: std::time::SystemTime) -> bool {
        self.last_arrival
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
            .is_some_and(|arrived| now.duration_since(arrived).is_ok_and(|age| age > RETENTION))
    }
}

/// What became of one failed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Read again from the stream and applied through the invalidator.
    Applied {
        records: usize,
    },
    /// Past retention; the keys the kept payload named were purged.
    Purged {
        keys: usize,
    },
    /// Past retention, and the record names no items: they may be stale until their TTL.
    Unrecoverable {
        why: String,
    },
    /// Not applied now (the stream or Redis failed); the record stays for the next redrive.
    Failed {
        why: String,
    },
    /// `--dry-run`: what would be done.
    WouldApply {
        records: usize,
    },
    WouldPurge {
        keys: Vec<String>,
    },
}

impl Outcome {
    /// Whether the record can leave its destination.
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Applied { .. } | Outcome::Purged { .. })
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Applied { records } => write!(f, "applied {records} records"),
            Outcome::Purged { keys } => write!(f, "past retention: purged {keys} keys"),
            Outcome::Unrecoverable { why } => write!(f, "UNRECOVERABLE: {why}"),
            Outcome::Failed { why } => write!(f, "failed, kept for the next redrive: {why}"),
            Outcome::WouldApply { records } => write!(f, "would apply {records} records"),
            Outcome::WouldPurge { keys } => {
                write!(f, "past retention: would purge {}", keys.join(" "))
            }
        }
    }
}

/// Compares two sequence numbers (decimal strings of any length).
fn seq_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn seq_of(record: &Value) -> Option<&str> {
    record
        .pointer("/dynamodb/SequenceNumber")
        .and_then(Value::as_str)
}

pub use crate::pages::DEFAULT_MAX_EMPTY_PAGES;

/// What reading a failed range from its shard came to.
#[derive(Debug)]
enum RangeRead {
    /// Every record of the range the shard still holds: read up to the range's end sequence
    /// number, or to the shard's end.
    Whole(Vec<Value>),
    /// `empty_pages` empty pages in a row before the range's end was reached: not read (yet).
    Stalled { records: usize, empty_pages: u32 },
}

/// Reads `batch`'s range from its shard to the range's end, through empty pages (see
/// [`ShardPages`]): it stops at the end sequence number or the shard's end, never at an empty
/// page, and gives up after `max_empty_pages` of them in a row. `Err` when the range cannot be
/// read (trimmed, the shard gone, or the stream failing).
async fn read_range(
    reader: &StreamReader,
    batch: &FailedBatch,
    max_empty_pages: u32,
) -> Result<RangeRead, local_stack::stream::StreamError> {
    let mut records = Vec::new();
    let iterator = reader
        .iterator(&batch.shard_id, &Position::At(batch.start.clone()))
        .await?;
    let mut pages = ShardPages::new(reader, iterator, max_empty_pages);
    while let Some(page) = pages.next().await? {
        for record in page {
            match seq_of(&record).map(|s| seq_cmp(s, &batch.end)) {
                Some(std::cmp::Ordering::Greater) => return Ok(RangeRead::Whole(records)),
                // The range's last record: an open shard has nothing more to give for it.
                Some(std::cmp::Ordering::Equal) => {
                    records.push(record);
                    return Ok(RangeRead::Whole(records));
                }
                _ => records.push(record),
            }
        }
    }
    Ok(match pages.end() {
        Some(PagesEnd::EmptyPages(empty_pages)) => RangeRead::Stalled {
            records: records.len(),
            empty_pages,
        },
        _ => RangeRead::Whole(records),
    })
}

/// Redrives one failed batch: from the stream through `invalidator`, or, past retention, by
/// purging the keys a kept payload names.
pub async fn redrive(
    batch: &FailedBatch,
    reader: &StreamReader,
    invalidator: &Invalidator<RedisCache>,
    max_empty_pages: u32,
    dry_run: bool,
) -> Outcome {
    let past = batch.past_retention(std::time::SystemTime::now());
    let read = if past {
        None
    } else {
        Some(read_range(reader, batch, max_empty_pages).await)
    };
    match read {
        // Nothing of a range cut short is applied: the record stays, and a later redrive reads
        // it whole.
        Some(Ok(RangeRead::Stalled {
            records,
            empty_pages,
        })) => Outcome::Failed {
            why: format!(
                "not read: {empty_pages} empty pages in a row from the stream after {records} \
                 records, before the range's end {} (see --max-empty-pages)",
                batch.end
            ),
        },
        Some(Ok(RangeRead::Whole(records))) if !records.is_empty() => {
            let n = records.len();
            if dry_run {
                return Outcome::WouldApply { records: n };
            }
            // In pieces of a Lambda batch's largest size, in order; the first failure stops it.
            for chunk in records.chunks(10_000) {
                let response = invalidator.handle(lambda_event(chunk.to_vec())).await;
                if let Some(failure) = response.batch_item_failures.first() {
                    return Outcome::Failed {
                        why: format!(
                            "the cache refused the batch from record {:?} on",
                            failure.item_identifier
                        ),
                    };
                }
            }
            Outcome::Applied { records: n }
        }
        // Readable but empty, or not readable: trimmed (past retention) unless the stream
        // itself failed, which a later redrive can retry.
        Some(Err(e)) if !is_trimmed(&e) => Outcome::Failed {
            why: local_stack::error::chain(&e),
        },
        _ => purge_named(batch, invalidator, dry_run).await,
    }
}

/// Past retention: purge what the kept payload names, or say that nothing is known.
async fn purge_named(
    batch: &FailedBatch,
    invalidator: &Invalidator<RedisCache>,
    dry_run: bool,
) -> Outcome {
    let Some(records) = &batch.records else {
        return Outcome::Unrecoverable {
            why: format!(
                "{} records of {} ({} to {}) are past the stream's 24-hour retention and the \
                 record does not name their items",
                batch.batch_size, batch.shard_id, batch.start, batch.end
            ),
        };
    };
    let mut keys: Vec<String> = records
        .iter()
        .filter_map(|r| invalidator.key_of_record(r).ok())
        .collect();
    keys.sort();
    keys.dedup();
    if dry_run {
        return Outcome::WouldPurge { keys };
    }
    match invalidator.cache().purge(&keys).await {
        Ok(_) => Outcome::Purged { keys: keys.len() },
        Err(e) => Outcome::Failed {
            why: local_stack::error::chain(&e),
        },
    }
}

/// How long a `ReceiveMessage` waits for messages unless told otherwise (long polling). A short
/// poll samples only some of SQS's servers and can answer nothing from a small queue that
/// still holds messages, so the queue counts as drained only when a long poll answers nothing;
/// that last poll costs this long.
pub const DEFAULT_RECEIVE_WAIT_SECONDS: u32 = 10;

/// Where failed batches' records are: the mapping's SQS queue, or the local stack's file.
pub enum Destination {
    Sqs {
        client: aws_sdk_sqs::Client,
        queue_url: String,
        /// `WaitTimeSeconds` of each `ReceiveMessage` (1 to 20).
        wait_seconds: u32,
    },
    File(PathBuf),
}

/// A record taken from a [`Destination`], with what it takes to remove it there.
pub struct Message {
    pub record: Value,
    /// The SQS message id, or the file's line: names the record in reports.
    pub id: String,
    handle: Handle,
}

enum Handle {
    Receipt(String),
    Line(usize),
}

/// What settling the records at their destination came to. A failure for one record does not
/// stop the others.
#[derive(Debug, Default)]
pub struct Settled {
    /// Records removed from the destination.
    pub removed: usize,
    /// Why some records could not be removed (or, on SQS, made visible again at once); each
    /// stays where it was, to be redriven again (applying a range again is harmless).
    pub errors: Vec<RedriveError>,
}

/// A `ReceiveMessage` call's timeouts: the client's (the operator command's), each lengthened by
/// the long poll's wait, which the call spends waiting by design.
fn long_poll_timeouts(
    client: &aws_sdk_sqs::Client,
    wait_seconds: u32,
) -> aws_sdk_sqs::config::Builder {
    let base = client
        .config()
        .timeout_config()
        .cloned()
        .unwrap_or_else(TimeoutConfig::disabled);
    let wait = Duration::from_secs(wait_seconds.into());
    let mut timeouts = base.to_builder();
    timeouts.set_operation_attempt_timeout(base.operation_attempt_timeout().map(|t| t + wait));
    timeouts.set_operation_timeout(base.operation_timeout().map(|t| t + wait));
    aws_sdk_sqs::config::Builder::default().timeout_config(timeouts.build())
}

impl Destination {
    /// Every record waiting. From SQS they are received with long polling until a poll answers
    /// nothing, with a visibility timeout long enough for the redrive; [`Destination::settle`]
    /// makes those left over visible again at once.
    pub async fn take(&self) -> Result<Vec<Message>, RedriveError> {
        match self {
            Destination::File(path) => {
                let text = match std::fs::read_to_string(path) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(source) => {
                        return Err(RedriveError::File {
                            path: path.clone(),
                            source,
                        })
                    }
                };
                text.lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                    .map(|(i, l)| {
                        Ok(Message {
                            record: serde_json::from_str(l).map_err(|source| {
                                RedriveError::Json {
                                    path: path.clone(),
                                    line: i + 1,
                                    source,
                                }
                            })?,
                            id: format!("line {}", i + 1),
                            handle: Handle::Line(i),
                        })
                    })
                    .collect()
            }
            Destination::Sqs {
                client,
                queue_url,
                wait_seconds,
            } => {
                let mut messages = Vec::new();
                loop {
                    let out = client
                        .receive_message()
                        .queue_url(queue_url)
                        .max_number_of_messages(10)
                        .visibility_timeout(300)
                        .wait_time_seconds(*wait_seconds as i32)
                        .customize()
                        .config_override(long_poll_timeouts(client, *wait_seconds))
                        .send()
                        .await
                        .map_err(|e| RedriveError::Sqs {
                            operation: "ReceiveMessage",
                            queue_url: queue_url.clone(),
                            source: e.into(),
                        })?;
                    let batch = out.messages.unwrap_or_default();
                    if batch.is_empty() {
                        break;
                    }
                    for m in batch {
                        let body = m.body.unwrap_or_default();
                        let record = serde_json::from_str(&body).unwrap_or(Value::String(body));
                        messages.push(Message {
                            record,
                            id: m.message_id.unwrap_or_default(),
                            handle: Handle::Receipt(m.receipt_handle.unwrap_or_default()),
                        });
                    }
                }
                Ok(messages)
            }
        }
    }

    /// Removes the records that were redriven (`done`); the others stay (and on SQS, are
    /// visible again at once rather than after the visibility timeout). On SQS each record is
    /// settled on its own: one that fails is reported and the rest are still settled.
    pub async fn settle(&self, messages: &[Message], done: &[bool]) -> Settled {
        match self {
            Destination::File(path) => {
                let removed: std::collections::HashSet<usize> = messages
                    .iter()
                    .zip(done)
                    .filter(|(_, d)| **d)
                    .filter_map(|(m, _)| match m.handle {
                        Handle::Line(i) => Some(i),
                        Handle::Receipt(_) => None,
                    })
                    .collect();
                match remove_lines(path, &removed) {
                    Ok(()) => Settled {
                        removed: removed.len(),
                        errors: Vec::new(),
                    },
                    Err(e) => Settled {
                        removed: 0,
                        errors: vec![e],
                    },
                }
            }
            Destination::Sqs {
                client, queue_url, ..
            } => {
                let mut settled = Settled::default();
                for (m, &d) in messages.iter().zip(done) {
                    let Handle::Receipt(receipt) = &m.handle else {
                        continue;
                    };
                    let release = || async {
                        client
                            .change_message_visibility()
                            .queue_url(queue_url)
                            .receipt_handle(receipt)
                            .visibility_timeout(0)
                            .send()
                            .await
                            .map(|_| ())
                            .map_err(|e| ("ChangeMessageVisibility", e.into()))
                    };
                    let result = if d {
                        let deleted = client
                            .delete_message()
                            .queue_url(queue_url)
                            .receipt_handle(receipt)
                            .send()
                            .await
                            .map(|_| ())
                            .map_err(|e| ("DeleteMessage", e.into()));
                        if deleted.is_err() {
                            // Back on the queue at once, like every record not removed. If this
                            // fails too, it comes back when its visibility timeout ends.
                            let _ = release().await;
                        }
                        deleted
                    } else {
                        release().await
                    };
                    match result {
                        Ok(()) => settled.removed += usize::from(d),
                        Err((operation, source)) => settled.errors.push(RedriveError::SqsMessage {
                            operation,
                            message_id: m.id.clone(),
                            queue_url: queue_url.clone(),
                            source,
                        }),
                    }
                }
                settled
            }
        }
    }
}

/// Removes lines `removed` (0-based) from the file at `path`.
fn remove_lines(
    path: &Path,
    removed: &std::collections::HashSet<usize>,
) -> Result<(), RedriveError> {
    if removed.is_empty() {
        return Ok(());
    }
    let io = |source| RedriveError::File {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    let kept: String = text
        .lines()
        .enumerate()
        .filter(|(i, l)| !removed.contains(i) && !l.trim().is_empty())
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    // Replaced whole (a new file renamed over the old): a crash leaves one or the other, never
    // half.
    let tmp = path.with_extension("redrive.tmp");
    std::fs::write(&tmp, kept).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A reader for the stream a failed batch names, on `client`.
pub fn reader_for(client: &aws_sdk_dynamodbstreams::Client, batch: &FailedBatch) -> StreamReader {
    StreamReader::new(client.clone(), &batch.stream_arn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(last_arrival: &str, payload: Option<Value>) -> Value {
        let mut r = json!({
            "requestContext": {"condition": "RetryAttemptsExhausted"},
            "version": "1.0",
            "DDBStreamBatchInfo": {
                "shardId": "shardId-1", "startSequenceNumber": "100", "endSequenceNumber": "250",
                "approximateArrivalOfFirstRecord": last_arrival,
                "approximateArrivalOfLastRecord": last_arrival,
                "batchSize": 3, "streamArn": "arn:aws:dynamodb:us-east-1:1:table/T/stream/x"
            }
        });
        if let Some(p) = payload {
            r["payload"] = p;
        }
        r
    }

    #[test]
    fn reads_lambdas_on_failure_record_and_a_kept_payload() {
        let b = FailedBatch::parse(&record("2026-11-26T10:00:00Z", None)).unwrap();
        assert_eq!(
            (
                b.shard_id.as_str(),
                b.start.as_str(),
                b.end.as_str(),
                b.batch_size
            ),
            ("shardId-1", "100", "250", 3)
        );
        assert_eq!(b.records, None);
        let payload = json!({"Records": [{"eventName": "MODIFY"}]});
        let as_string = Value::String(payload.to_string());
        for p in [payload.clone(), as_string] {
            let b = FailedBatch::parse(&record("2026-11-26T10:00:00Z", Some(p))).unwrap();
            assert_eq!(b.records.unwrap().len(), 1);
        }
        assert!(matches!(
            FailedBatch::parse(&json!({"hello": 1})),
            Err(RedriveError::NotAFailureRecord("streamArn"))
        ));
    }

    #[test]
    fn retention_is_judged_by_the_last_records_arrival() {
        let now = humantime::parse_rfc3339("2026-11-26T12:00:00Z").unwrap();
        let old = FailedBatch::parse(&record("2026-11-25T11:59:00Z", None)).unwrap();
        let young = FailedBatch::parse(&record("2026-11-25T12:01:00Z", None)).unwrap();
        let fractional = FailedBatch::parse(&record("2026-11-25T12:01:00.250Z", None)).unwrap();
        assert!(old.past_retention(now));
        assert!(!young.past_retention(now));
        assert!(!fractional.past_retention(now));
    }

    #[test]
    fn sequence_numbers_compare_as_numbers() {
        use std::cmp::Ordering::*;
        assert_eq!(seq_cmp("99", "100"), Less);
        assert_eq!(seq_cmp("250", "250"), Equal);
        assert_eq!(
            seq_cmp("111000000000000000999", "111000000000000001000"),
            Less
        );
    }
}
