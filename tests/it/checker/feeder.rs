//! The feeder: what Lambda's event source mapping does, played against the run's real stream
//! with faults the mapping may show (duplicate deliveries, failures after a prefix of a batch,
//! bisection), recording when each record was first acknowledged. Which records a response
//! acknowledges is decided by the local poller's rule (`local_stack::poller::first_failure`),
//! the same one the local stack runs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use local_stack::poller::{first_failure, BatchFunction};
use local_stack::stream::{lambda_event, Position, StreamReader};
use product_cache::cache::RedisCache;
use product_cache::invalidate::Invalidator;
use serde_json::Value;
use tokio::sync::watch;

use super::actors::Shared;
use super::config::Config;
use super::faults::FailingCache;
use super::history::{Ack, Nanos, Tally};

/// A stream record as the feeder tracks it.
struct Rec {
    value: Value,
    item: u16,
    index: u32,
}

struct RecState {
    delete: bool,
    seq: String,
    deliveries: u32,
    acked: Option<Nanos>,
}

pub struct FeedOutcome {
    pub acks: Vec<Ack>,
    pub stats: Tally,
    /// Every write's record was acknowledged within [`DRAIN_WITHIN`] of the writers stopping.
    pub drained: bool,
    /// When batches failed for want of a replica's confirmation.
    pub unconfirmed: Vec<Nanos>,
    /// When batches were acknowledged confirmed by fewer replicas than configured.
    pub under_replicated: Vec<Nanos>,
}

/// What Lambda's event source mapping does: reads the stream, forms batches, invokes the
/// invalidator, honours partial batch responses, bisects, and re-delivers (at least once).
pub struct Feeder {
    shared: Arc<Shared>,
    stream: StreamReader,
    iterator: String,
    invalidator: Invalidator<FailingCache<RedisCache>>,
    /// With the flipped version attribute setting, used once `Flipped::invalidator` is set.
    flipped: Option<Invalidator<FailingCache<RedisCache>>>,
    rng: fastrand::Rng,
    max_batch: usize,
    duplicate_probability: f64,
    partial_failure_probability: f64,
    bisect_probability: f64,
    item_ids: HashMap<String, u16>,
    /// Read from the stream, not yet acknowledged, in stream order.
    pending: VecDeque<Arc<Rec>>,
    /// Sizes of the next batches, from the front of `pending`: a retried batch or its halves.
    forced: VecDeque<usize>,
    /// Acknowledged batches, for duplicate deliveries.
    pool: Vec<Pooled>,
    pooled: u64,
    replay_after_data_loss: bool,
    generation_seen: u64,
    events: HashSet<String>,
    records: HashMap<(u16, u32), RecState>,
    acked: usize,
    stats: Tally,
}

const POOL: usize = 256;

/// An acknowledged batch.
struct Pooled {
    /// Order of acknowledgement.
    n: u64,
    batch: Vec<Arc<Rec>>,
}
const DRAIN_WITHIN: Duration = Duration::from_secs(60);

impl Feeder {
    /// Takes its shard iterator at TRIM_HORIZON, so start it before anything is written.
    /// `flipped` is the invalidator with the flipped version attribute, for runs that flip it.
    pub async fn start(
        cfg: &Config,
        shared: Arc<Shared>,
        stream: StreamReader,
        invalidator: Invalidator<FailingCache<RedisCache>>,
        flipped: Option<Invalidator<FailingCache<RedisCache>>>,
    ) -> Self {
        let shard = stream.shards().await.expect("DescribeStream");
        let shard = &shard.first().expect("the stream has a shard").shard_id;
        let iterator = stream
            .iterator(shard, &Position::TrimHorizon)
            .await
            .expect("GetShardIterator")
            .expect("an iterator");
        let item_ids = shared
            .items
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u16))
            .collect();
        Self {
            shared,
            stream,
            iterator,
            invalidator,
            flipped,
            rng: fastrand::Rng::with_seed(cfg.seed ^ 0xFEED),
            max_batch: cfg.max_batch,
            duplicate_probability: cfg.duplicate_probability,
            partial_failure_probability: cfg.partial_failure_probability,
            bisect_probability: cfg.bisect_probability,
            item_ids,
            pending: VecDeque::new(),
            forced: VecDeque::new(),
            pool: Vec::new(),
            pooled: 0,
            replay_after_data_loss: cfg.replay_after_data_loss,
            generation_seen: 0,
            events: HashSet::new(),
            records: HashMap::new(),
            acked: 0,
            stats: Tally::default(),
        }
    }

    /// Feeds until `expected` (the number of writes, sent once the writers stop) records are
    /// acknowledged and nothing is pending, or [`DRAIN_WITHIN`] has passed since.
    pub async fn run(mut self, expected: watch::Receiver<Option<usize>>) -> FeedOutcome {
        let clock = self.shared.clock;
        let mut drain_started = None;
        let mut backoff = Duration::from_millis(5);
        let drained = loop {
            if let Some(n) = *expected.borrow() {
                let since = *drain_started.get_or_insert(clock.now());
                if self.acked >= n && self.pending.is_empty() {
                    break true;
                }
                if clock.now() - since > DRAIN_WITHIN.as_nanos() as Nanos {
                    break false;
                }
            }
            if self.pending.len() < 2 * self.max_batch {
                self.poll().await;
            }
            if self.pending.is_empty() {
                // Short polling: the pace of an idle poller, not a wait for something.
                tokio::time::sleep(Duration::from_millis(3)).await;
                continue;
            }
            let generation = self.shared.generation.current();
            if generation.is_some_and(|g| g > self.generation_seen) {
                self.generation_seen = generation.unwrap();
                if self.replay_after_data_loss {
                    self.pool.sort_by_key(|p| p.n);
                    let old: Vec<Vec<Arc<Rec>>> =
                        self.pool.iter().map(|p| p.batch.clone()).collect();
                    for batch in old {
                        self.stats.add("batches replayed after the data loss", 1);
                        self.duplicate(&batch).await;
                    }
                }
            }
            if !self.pool.is_empty() && self.rng.f64() < self.duplicate_probability {
                // Any acknowledged batch, also one from before the data loss (which forgot its
                // positions).
                let batch = self.pool[self.rng.usize(..self.pool.len())].batch.clone();
                self.stats.add("duplicate batches", 1);
                self.duplicate(&batch).await;
            }
            let n = self
                .forced
                .pop_front()
                .unwrap_or_else(|| self.rng.usize(1..=self.max_batch))
                .min(self.pending.len());
            let batch: Vec<Arc<Rec>> = self.pending.iter().take(n).cloned().collect();
            // One setting for the whole invocation, as a Lambda invocation has.
            let flipped = self.flipped_now();
            if flipped {
                self.stats
                    .add("batches with the flipped version attribute", 1);
            }
            let injected = self.rng.f64() < self.partial_failure_probability;
            if injected {
                let prefix = self.rng.usize(..n);
                self.invalidator(flipped).cache().arm(prefix);
                self.stats.add("partial failures", 1);
            }
            // Invoked as the poller invokes it, so its response is judged on the same JSON.
            let records: Vec<Value> = batch.iter().map(|r| r.value.clone()).collect();
            let response = self
                .invalidator(flipped)
                .invoke(lambda_event(records.clone()))
                .await
                .expect("the invalidator's response serializes");
            let at = clock.now();
            let unused = self.invalidator(flipped).cache().disarm();
            self.stats.add("batches", 1);
            self.stats.add("records delivered", n as u64);
            for r in &batch {
                self.records.get_mut(&(r.item, r.index)).unwrap().deliveries += 1;
            }
            let failed_at = first_failure(&records, &response);
            let ok = failed_at.unwrap_or(n);
            for r in batch.iter().take(ok) {
                let state = self.records.get_mut(&(r.item, r.index)).unwrap();
                if state.acked.is_none() {
                    state.acked = Some(at);
                    self.acked += 1;
                    self.shared.acked.fetch_add(1, Ordering::Relaxed);
                }
                self.pending.pop_front();
            }
            if ok > 0 {
                self.pooled += 1;
                let acked = Pooled {
                    n: self.pooled,
                    batch: batch[..ok].to_vec(),
                };
                if self.pool.len() < POOL {
                    self.pool.push(acked);
                } else {
                    let i = self.rng.usize(..POOL);
                    self.pool[i] = acked;
                }
            }
            if injected && !unused && failed_at.is_none() {
                self.stats.add("ANOMALY injected failure not reported", 1);
            }
            match failed_at {
                None => backoff = Duration::from_millis(5),
                Some(f) => {
                    self.stats.add("failed batches", 1);
                    let rest = n - f;
                    // The first failure that can be split always is, so every run bisects.
                    let first = self.stats.get("bisections") == 0;
                    if rest >= 2 && (first || self.rng.f64() < self.bisect_probability) {
                        self.stats.add("bisections", 1);
                        self.forced.push_front(rest - rest / 2);
                        self.forced.push_front(rest / 2);
                    } else {
                        self.forced.push_front(rest);
                    }
                    if !injected || unused {
                        // Redis itself failed (restarting): retry with backoff, as Lambda does.
                        self.stats.add("redis failures", 1);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(200));
                    }
                }
            }
        };
        let mut acks = Vec::new();
        for ((item, index), s) in self.records {
            if let Some(at) = s.acked {
                acks.push(Ack {
                    item,
                    index,
                    delete: s.delete,
                    sequence_number: s.seq,
                    at,
                    deliveries: s.deliveries,
                });
            }
        }
        let times =
            |log: fn(&FailingCache<RedisCache>) -> &std::sync::Mutex<Vec<std::time::Instant>>| {
                let mut at: Vec<Nanos> = [Some(&self.invalidator), self.flipped.as_ref()]
                    .into_iter()
                    .flatten()
                    .flat_map(|i| log(i.cache()).lock().unwrap().clone())
                    .map(|t| clock.at(t))
                    .collect();
                at.sort_unstable();
                at
            };
        let unconfirmed = times(|c| &c.unconfirmed);
        let under_replicated = times(|c| &c.under_replicated);
        FeedOutcome {
            acks,
            stats: self.stats,
            drained,
            unconfirmed,
            under_replicated,
        }
    }

    /// Re-delivers an acknowledged batch. Its answer does not matter.
    async fn duplicate(&mut self, batch: &[Arc<Rec>]) {
        self.stats.add("duplicate records", batch.len() as u64);
        for r in batch {
            self.records.get_mut(&(r.item, r.index)).unwrap().deliveries += 1;
        }
        let _ = self
            .invalidator(self.flipped_now())
            .handle(event(batch))
            .await;
    }

    /// Whether the invalidator's version attribute has flipped (`Flipped::invalidator`).
    fn flipped_now(&self) -> bool {
        self.shared.flipped.invalidator.load(Ordering::SeqCst)
    }

    /// The invalidator with the flipped setting if `flipped` (and the run flips it).
    fn invalidator(&self, flipped: bool) -> &Invalidator<FailingCache<RedisCache>> {
        match &self.flipped {
            Some(invalidator) if flipped => invalidator,
            _ => &self.invalidator,
        }
    }

    /// One `GetRecords`: new records go to the end of `pending`.
    async fn poll(&mut self) {
        self.stats.add("polls", 1);
        let (records, next) = match self.stream.read(&self.iterator, 1000).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = ?e, "GetRecords failed; polling again");
                self.stats.add("GetRecords errors", 1);
                return;
            }
        };
        self.iterator = next.expect("the shard stays open");
        for value in records {
            let event_id = value["eventID"].as_str().unwrap_or_default().to_owned();
            if !self.events.insert(event_id) {
                // moto can hand out a record twice when two writes raced for one sequence
                // number; the stream itself has each change once.
                self.stats.add("stream re-reads", 1);
                continue;
            }
            let d = &value["dynamodb"];
            let id = d["Keys"]["productId"]["S"].as_str().unwrap_or_default();
            let Some(&item) = self.item_ids.get(id) else {
                panic!("a stream record of an unknown item: {value}");
            };
            let delete = value["eventName"] == "REMOVE";
            let image = if delete {
                &d["OldImage"]
            } else {
                &d["NewImage"]
            };
            let version: u32 = image["version"]["N"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("a record without a version: {value}"));
            let index = if delete { version + 1 } else { version };
            let seq = d["SequenceNumber"].as_str().unwrap_or_default().to_owned();
            let previous = self.records.insert(
                (item, index),
                RecState {
                    delete,
                    seq,
                    deliveries: 0,
                    acked: None,
                },
            );
            assert!(
                previous.is_none(),
                "two stream records for {id} #{index}: {value}"
            );
            self.pending.push_back(Arc::new(Rec { value, item, index }));
        }
    }
}

fn event(batch: &[Arc<Rec>]) -> Value {
    lambda_event(batch.iter().map(|r| r.value.clone()).collect())
}
