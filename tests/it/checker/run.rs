//! One checker run: the services, the actors, and the checks once they have stopped.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue as Av;
use local_stack::services::RedisServer;
use local_stack::stream::{lambda_event, Position, StreamReader};
use product_cache::cache::{Guards, RedisCache};
use product_cache::config::{CacheSettings, InvalidationMode};
use product_cache::document::Document;
use product_cache::id::{KeyType, ProductId};
use product_cache::invalidate::Invalidator;
use product_cache::read::{CacheStatus, Lookup, ReadPath};
use product_cache::store::ProductStore;
use serde_json::Value;
use tokio::sync::{watch, Notify};

use super::faults::{FailingCache, SlowStore};
use super::history::{
    ms, percentile, Ack, Clock, History, Nanos, Read, Seen, Tally, Write, WriteKind,
};
use crate::support::{
    dynamo_store, init_logging, moto_endpoint, redis_cache, unique_table, Counting,
};

/// What to run. [`Config::new`] has the defaults; `CHECKER_OPS`, `CHECKER_SEED` and
/// `CHECKER_MAX_SECS` override the size, the seed and the time bound, and
/// `CHECKER_READS_PER_WRITE` the mix.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: &'static str,
    pub mode: InvalidationMode,
    pub guards: Guards,
    pub version_attribute: Option<String>,
    /// Operations (reads and writes) to issue; the run stops after them (or at `max_duration`).
    pub ops: u64,
    pub seed: u64,
    pub items: usize,
    pub writers: usize,
    pub readers: usize,
    /// The readers' pace while writers run (`CHECKER_READS_PER_WRITE`).
    pub reads_per_write: u64,
    /// Of the writes to an existing item.
    pub delete_probability: f64,
    pub lease: Duration,
    pub lease_wait: Duration,
    /// Of the readers' `GetItem`s: pause after the table answered, before the fill.
    pub slow_read_probability: f64,
    pub slow_read_pause: (Duration, Duration),
    pub max_batch: usize,
    /// Per delivered batch: first re-deliver an earlier, acknowledged batch.
    pub duplicate_probability: f64,
    /// Per delivered batch: apply a prefix of its ops, then fail.
    pub partial_failure_probability: f64,
    /// Per failed batch: retry it as two halves.
    pub bisect_probability: f64,
    pub herds: usize,
    pub herd_size: usize,
    pub max_duration: Duration,
    /// Right after the Redis restart, re-deliver every pooled acknowledged batch from before it,
    /// in order (an event source mapping resuming from an older checkpoint). The restart forgot
    /// `{key}:ver`, so this is what the cache's restart rule must survive
    /// (`old_records_replayed_after_a_restart`). Single duplicates are drawn from all
    /// acknowledged batches, before or after the restart, either way.
    pub replay_after_restart: bool,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
    )
}

impl Config {
    pub fn new(name: &'static str, mode: InvalidationMode) -> Self {
        let ops = env_u64("CHECKER_OPS").unwrap_or(5_000);
        let lease = Duration::from_millis(150);
        Self {
            name,
            mode,
            guards: Guards::default(),
            version_attribute: None,
            ops,
            seed: env_u64("CHECKER_SEED").unwrap_or(0x5EED_C0DE),
            items: 16,
            writers: 4,
            readers: 8,
            reads_per_write: env_u64("CHECKER_READS_PER_WRITE").unwrap_or(4),
            delete_probability: 0.08,
            lease,
            lease_wait: lease * 3,
            // Refresh mode misses rarely: make its few table reads slow more often.
            slow_read_probability: if mode == InvalidationMode::Delete {
                0.08
            } else {
                0.2
            },
            slow_read_pause: (lease + lease / 5, lease * 3),
            max_batch: 40,
            duplicate_probability: 0.08,
            partial_failure_probability: 0.08,
            bisect_probability: 0.5,
            herds: (ops / 100_000).clamp(3, 10) as usize,
            herd_size: 200,
            replay_after_restart: false,
            max_duration: Duration::from_secs(
                env_u64("CHECKER_MAX_SECS").unwrap_or_else(|| (ops / 2_000).max(90)),
            ),
        }
    }
}

/// What a run found.
pub struct Report {
    pub text: String,
    pub writes: Tally,
    pub reads: Tally,
    pub faults: Tally,
    /// Violations of invariants 1 to 4.
    pub violations: [usize; 4],
    /// Reads of a version that was never written, or not yet: a checker or system bug.
    pub phantoms: usize,
}

impl Report {
    /// Zero violations, and proof that the run exercised what it claims to.
    pub fn assert_clean(&self) {
        assert_eq!(
            (self.violations, self.phantoms),
            ([0; 4], 0),
            "violations of invariants 1-4 (and phantom reads); the report is above:\n{}",
            self.text
                .lines()
                .find(|l| l.starts_with("violations"))
                .unwrap_or_default()
        );
        self.assert_exercised();
    }

    pub fn assert_exercised(&self) {
        for fault in [
            "duplicate batches",
            "partial failures",
            "bisections",
            "redis restarts",
            "slow reads",
            "herds",
        ] {
            assert!(
                self.faults.get(fault) > 0,
                "no {fault} were injected:\n{}",
                self.text
            );
        }
        assert!(self.reads.get("total") > 0, "no reads:\n{}", self.text);
        assert!(self.writes.get("delete") > 0, "no deletes:\n{}", self.text);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Writers have stopped; the feeder drains the stream, readers keep reading.
    Draining,
    Done,
}

/// The operation budget, shared by readers and writers, and the pace of the readers.
struct Budget {
    issued: AtomicU64,
    total: u64,
    writes: AtomicU64,
    reads: AtomicU64,
    reads_per_write: u64,
    /// Signalled after every write, and when the writers stop.
    written: Notify,
    deadline: Nanos,
    clock: Clock,
    /// Percent of the budget used, for the chaos schedule.
    progress: watch::Sender<u64>,
}

impl Budget {
    fn take(&self) -> bool {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let pct = if n >= self.total || self.clock.now() > self.deadline {
            100
        } else {
            (n + 1) * 100 / self.total
        };
        self.progress.send_if_modified(|p| {
            let newer = pct > *p;
            if newer {
                *p = pct;
            }
            newer
        });
        pct < 100
    }

    /// Readers keep to `reads_per_write` reads per write while the writers run (plus a slack of
    /// a few reads per item), so a run's operations are a mix of both whatever the speeds.
    async fn pace_reader(&self, phase: &watch::Receiver<Phase>, items: u64) {
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            let allowed = self.reads_per_write * (self.writes.load(Ordering::Relaxed) + 4 * items);
            if self.reads.load(Ordering::Relaxed) < allowed || *phase.borrow() != Phase::Running {
                break;
            }
            written.await;
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// Which Redis is up: `begun` counts restarts started, `done` restarts finished. A batch applied
/// while both equal `g` lives in generation `g` of the data.
#[derive(Default)]
struct Generation {
    begun: AtomicU64,
    done: AtomicU64,
}

impl Generation {
    /// The generation now, or `None` while a restart is under way.
    fn current(&self) -> Option<u64> {
        let done = self.done.load(Ordering::SeqCst);
        (self.begun.load(Ordering::SeqCst) == done).then_some(done)
    }
}

/// What every actor shares.
struct Shared {
    generation: Generation,
    /// Records acknowledged so far, for progress lines.
    acked: AtomicU64,
    clock: Clock,
    budget: Budget,
    phase: watch::Sender<Phase>,
    dynamodb: aws_sdk_dynamodb::Client,
    table: String,
    items: Vec<String>,
}

pub async fn run(cfg: Config) -> Report {
    init_logging();
    let clock = Clock::start();
    let mut redis = RedisServer::start().await.expect("redis-server starts");
    let redis_url = redis.url();
    let sdk = local_stack::table::local_sdk_config(moto_endpoint()).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let table = unique_table("checker");
    let stream_arn = local_stack::table::ensure_table(&dynamodb, &table, "productId", KeyType::S)
        .await
        .expect("table created");
    let stream = StreamReader::new(aws_sdk_dynamodbstreams::Client::new(&sdk), stream_arn);

    let settings = CacheSettings {
        lease: cfg.lease,
        lease_wait: cfg.lease_wait,
        redis_timeout: Duration::from_millis(250),
        version_attribute: cfg.version_attribute.clone(),
        guards: cfg.guards,
        ..CacheSettings::default()
    };
    let items: Vec<String> = (0..cfg.items).map(|i| format!("item-{i:02}")).collect();
    let (progress, progress_rx) = watch::channel(0);
    let (phase, _) = watch::channel(Phase::Running);
    let shared = Arc::new(Shared {
        generation: Generation::default(),
        acked: AtomicU64::new(0),
        clock,
        budget: Budget {
            issued: AtomicU64::new(0),
            total: cfg.ops.max(1),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            reads_per_write: cfg.reads_per_write,
            written: Notify::new(),
            deadline: clock.now() + cfg.max_duration.as_nanos() as Nanos,
            clock,
            progress,
        },
        phase,
        dynamodb: dynamodb.clone(),
        table: table.clone(),
        items: items.clone(),
    });

    // The feeder starts at TRIM_HORIZON before anything is written.
    let shard = stream.shards().await.expect("DescribeStream");
    let shard = &shard.first().expect("the stream has a shard").shard_id;
    let iterator = stream
        .iterator(shard, &Position::TrimHorizon)
        .await
        .expect("GetShardIterator")
        .expect("an iterator");
    let (expected_tx, expected_rx) = watch::channel(None);
    let feeder = Feeder {
        shared: shared.clone(),
        stream: stream.clone(),
        iterator,
        invalidator: Invalidator::new(
            FailingCache::new(redis_cache(&redis_url, &settings).await),
            cfg.mode,
            settings.clone(),
        ),
        rng: fastrand::Rng::with_seed(cfg.seed ^ 0xFEED),
        max_batch: cfg.max_batch,
        duplicate_probability: cfg.duplicate_probability,
        partial_failure_probability: cfg.partial_failure_probability,
        bisect_probability: cfg.bisect_probability,
        item_ids: items
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u16))
            .collect(),
        pending: VecDeque::new(),
        forced: VecDeque::new(),
        pool: Vec::new(),
        pooled: 0,
        replay_after_restart: cfg.replay_after_restart,
        generation_seen: 0,
        events: HashSet::new(),
        records: HashMap::new(),
        acked: 0,
        stats: Tally::default(),
    };
    let feeder = tokio::spawn(feeder.run(expected_rx));

    let mut writers = Vec::new();
    for w in 0..cfg.writers {
        let owned: Vec<u16> = (0..cfg.items)
            .filter(|i| i % cfg.writers == w)
            .map(|i| i as u16)
            .collect();
        let rng = fastrand::Rng::with_seed(cfg.seed.wrapping_add(1 + w as u64));
        writers.push(tokio::spawn(writer(
            shared.clone(),
            owned,
            rng,
            cfg.delete_probability,
        )));
    }

    let mut readers = Vec::new();
    let table_reads = Arc::new(AtomicU64::new(0));
    let slowed = Arc::new(AtomicU64::new(0));
    for r in 0..cfg.readers {
        let store = SlowStore {
            inner: dynamo_store(&sdk, &table, &settings),
            rng: std::sync::Mutex::new(fastrand::Rng::with_seed(
                cfg.seed.wrapping_add(1000 + r as u64),
            )),
            probability: cfg.slow_read_probability,
            pause: cfg.slow_read_pause,
            reads: table_reads.clone(),
            slowed: slowed.clone(),
        };
        let read_path = ReadPath::new(
            redis_cache(&redis_url, &settings).await,
            store,
            settings.clone(),
        );
        let rng = fastrand::Rng::with_seed(cfg.seed.wrapping_add(2000 + r as u64));
        readers.push(tokio::spawn(reader(shared.clone(), read_path, rng)));
    }

    // Chaos: herds of cold reads and one Redis restart at points of the run. Run on this task
    // (not spawned): the restarted redis-server is tied to the thread that spawns it.
    let herd_settings = CacheSettings {
        // A lease long enough that one fill fits in it even on a loaded machine: the claim is
        // one table read per lease period.
        lease: Duration::from_secs(2),
        lease_wait: Duration::from_secs(4),
        redis_timeout: Duration::from_secs(1),
        ..settings.clone()
    };
    let chaos = async {
        let mut schedule: Vec<(u64, Option<usize>)> = (0..cfg.herds)
            .map(|h| (10 + 80 * h as u64 / cfg.herds.max(1) as u64, Some(h)))
            .collect();
        schedule.push((45, None));
        schedule.sort();
        let mut faults = Tally::default();
        let mut herd_violations = Vec::new();
        let mut events = Vec::new();
        let mut progress = progress_rx.clone();
        for (pct, what) in schedule {
            progress.wait_for(|p| *p >= pct).await.unwrap();
            if *shared.phase.borrow() != Phase::Running {
                faults.add("chaos events skipped (run over)", 1);
                continue;
            }
            match what {
                None => {
                    shared.generation.begun.fetch_add(1, Ordering::SeqCst);
                    redis.restart().await.expect("redis-server restarts");
                    shared.generation.done.fetch_add(1, Ordering::SeqCst);
                    faults.add("redis restarts", 1);
                    events.push(format!("redis restarted at {:.1} ms", ms(clock.now())));
                    tracing::info!(at_ms = ms(clock.now()), "redis restarted");
                }
                Some(h) => {
                    events.push(format!("herd on cold-{h} at {:.1} ms", ms(clock.now())));
                    let outcome = herd(
                        &redis_url,
                        &herd_settings,
                        &sdk,
                        &table,
                        &format!("cold-{h}"),
                        cfg.herd_size,
                    )
                    .await;
                    faults.add("herds", 1);
                    if let Some(v) = outcome {
                        herd_violations.push(v);
                    }
                }
            }
        }
        (faults, herd_violations, events)
    };

    // A line per tenth of the run, for long runs (`--nocapture`).
    let progress_lines = async {
        let mut progress = progress_rx.clone();
        for tenth in 1..=10 {
            if progress.wait_for(|p| *p >= tenth * 10).await.is_err() {
                break;
            }
            println!(
                "[{}] {:>3}% of {} ops at {:.1} s: {} writes, {} reads, {} records acknowledged",
                cfg.name,
                tenth * 10,
                cfg.ops,
                ms(clock.now()) / 1e3,
                shared.budget.writes.load(Ordering::Relaxed),
                shared.budget.reads.load(Ordering::Relaxed),
                shared.acked.load(Ordering::Relaxed),
            );
        }
    };
    let actors = async {
        let mut writes = Vec::new();
        for w in writers {
            writes.extend(w.await.expect("writer task"));
        }
        let writers_done = clock.now();
        println!(
            "[{}] writers stopped at {:.1} s; draining the stream",
            cfg.name,
            ms(writers_done) / 1e3
        );
        expected_tx.send_replace(Some(writes.len()));
        shared.phase.send_replace(Phase::Draining);
        shared.budget.written.notify_waiters();
        let feed = feeder.await.expect("feeder task");
        shared.phase.send_replace(Phase::Done);
        let mut reads = Vec::new();
        for r in readers {
            reads.extend(r.await.expect("reader task"));
        }
        (writes, writers_done, feed, reads)
    };
    let ((chaos_faults, herd_violations, chaos_events), (writes, writers_done, feed, reads), ()) =
        tokio::join!(chaos, actors, progress_lines);
    let run_time = clock.now();
    println!(
        "[{}] drained at {:.1} s; checking the cache and replaying the stream",
        cfg.name,
        ms(run_time) / 1e3
    );

    // Invariant 3: the stream is drained and nothing else writes; every cached key equals the
    // table or is absent.
    let conn_client = redis::Client::open(redis_url.clone()).unwrap();
    let mut conn = conn_client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let store = dynamo_store(&sdk, &table, &settings);
    let mut inv3 = Vec::new();
    if !feed.drained {
        inv3.push(format!(
            "the stream was not drained: {} of {} writes acknowledged",
            feed.acks.len(),
            writes.len()
        ));
    }
    // Every known id, and any other key the cache holds.
    let mut all_ids: std::collections::BTreeSet<String> = items
        .iter()
        .cloned()
        .chain((0..cfg.herds).map(|h| format!("cold-{h}")))
        .collect();
    all_ids.extend(
        snapshot(&mut conn)
            .await
            .into_keys()
            .map(|k| k["product:".len()..].to_owned()),
    );
    for id in all_ids {
        let key = format!("product:{id}");
        let cached: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let item = store
            .get(&ProductId::parse(&id, KeyType::S).unwrap())
            .await
            .expect("GetItem");
        let want = match &item {
            Some(item) => Document::from_item(item).unwrap().into_string(),
            None => "null".to_owned(),
        };
        if let Some(cached) = cached {
            if cached != want {
                inv3.push(format!("{key}: cached {cached}, table has {want}"));
            }
        }
    }

    // Invariant 2: every record once more from TRIM_HORIZON changes no cached value.
    let before_at = clock.now();
    let before = snapshot(&mut conn).await;
    let replay = Invalidator::new(
        redis_cache(&redis_url, &settings).await,
        cfg.mode,
        settings.clone(),
    );
    let mut seen = HashSet::new();
    let records: Vec<Value> = stream
        .read_available(&Position::TrimHorizon)
        .await
        .expect("stream read")
        .into_iter()
        .filter(|r| seen.insert(r["eventID"].as_str().unwrap_or_default().to_owned()))
        .collect();
    let replayed = records.len();
    for batch in records.chunks(100) {
        let response = replay.handle(lambda_event(batch.to_vec())).await;
        assert!(
            response.batch_item_failures.is_empty(),
            "the replay failed: {response:?}"
        );
    }
    let after = snapshot(&mut conn).await;
    let mut inv2 = Vec::new();
    let mut expired = 0;
    for key in before
        .keys()
        .chain(after.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (was, is) = (before.get(key), after.get(key));
        match (was, is) {
            (Some(a), Some(b)) if a.0 == b.0 => {}
            // A short-lived `null` may time out during a long replay: not the replay's doing.
            (Some((_, Some(ttl))), None) if before_at + ttl.as_nanos() as Nanos <= clock.now() => {
                expired += 1;
            }
            _ => inv2.push(format!(
                "{key}: {:?} became {:?}",
                was.map(|w| &w.0),
                is.map(|i| &i.0)
            )),
        }
    }
    drop(redis);
    println!(
        "[{}] replayed {replayed} records by {:.1} s; analysing the history",
        cfg.name,
        ms(clock.now()) / 1e3
    );

    // Invariant 1 and staleness.
    let mut writes_tally = Tally::default();
    for w in &writes {
        writes_tally.add(
            match w.kind {
                WriteKind::Put => "put",
                WriteKind::Update => "update",
                WriteKind::Delete => "delete",
            },
            1,
        );
    }
    writes_tally.add("total", writes.len() as u64);
    let mut reads_tally = Tally::default();
    for r in &reads {
        reads_tally.add(r.status.as_str(), 1);
        reads_tally.add(
            match r.seen {
                Seen::Found(_) => "found",
                Seen::NotFound => "not found",
                Seen::Error => "error",
            },
            1,
        );
    }
    reads_tally.add("total", reads.len() as u64);
    let mut faults = feed.stats;
    for (k, v) in chaos_faults.0 {
        faults.add(k, v);
    }
    faults.add("slow reads", slowed.load(Ordering::Relaxed));
    let table_reads = table_reads.load(Ordering::Relaxed);
    let ops = (writes.len() + reads.len()) as u64;
    let latency = |mut d: Vec<Nanos>| {
        d.sort_unstable();
        format!(
            "p50 {:.1} ms, p99 {:.1} ms",
            ms(percentile(&d, 50.0)),
            ms(percentile(&d, 99.0))
        )
    };
    let latencies = format!(
        "latency: writes {}; hits {}; misses {}",
        latency(writes.iter().map(|w| w.end - w.start).collect()),
        latency(
            reads
                .iter()
                .filter(|r| r.status == CacheStatus::Hit)
                .map(|r| r.end - r.start)
                .collect()
        ),
        latency(
            reads
                .iter()
                .filter(|r| r.status == CacheStatus::Miss)
                .map(|r| r.end - r.start)
                .collect()
        ),
    );
    let history = History::new(items.clone(), writes, feed.acks, reads);
    let (stale, stale_detail, phantoms, phantom_detail) = history.stale_reads();
    let (staleness, unseen) = history.staleness();

    let violations = [stale, inv2.len(), inv3.len(), herd_violations.len()];
    let mut text = String::new();
    let _ = writeln!(
        text,
        "== consistency checker: {} ==\nmode {:?}, guards {:?}, version attribute {:?}, seed {:#x} \
         (CHECKER_SEED), {} items, {} writers, {} readers, lease {:?}, lease wait {:?}",
        cfg.name,
        cfg.mode,
        cfg.guards,
        cfg.version_attribute,
        cfg.seed,
        cfg.items,
        cfg.writers,
        cfg.readers,
        cfg.lease,
        cfg.lease_wait,
    );
    let _ = writeln!(
        text,
        "operations: {ops} in {:.1} s ({:.0}/s; writes stopped at {:.1} s, drained and checked \
         by {:.1} s)",
        ms(run_time) / 1e3,
        ops as f64 / (ms(run_time) / 1e3),
        ms(writers_done) / 1e3,
        ms(clock.now()) / 1e3,
    );
    let _ = writeln!(text, "  writes: {}", writes_tally.line());
    let _ = writeln!(
        text,
        "  reads:  {}; table reads by readers {table_reads}",
        reads_tally.line()
    );
    let _ = writeln!(text, "  {latencies}");
    let _ = writeln!(text, "faults and feeder: {}", faults.line());
    let _ = writeln!(text, "  chaos: {}", chaos_events.join(", "));
    let _ = writeln!(
        text,
        "  TRIM_HORIZON replay: {replayed} records ({expired} keys timed out meanwhile)"
    );
    let _ = writeln!(
        text,
        "violations: invariant 1 (stale reads) {stale}, 2 (replay changed the cache) {}, \
         3 (cache differs from the table) {}, 4 (a herd read the table more than once per {:?} lease) {}; \
         phantom reads {phantoms}",
        inv2.len(),
        inv3.len(),
        herd_settings.lease,
        herd_violations.len()
    );
    for s in &stale_detail {
        let _ = writeln!(text, "  [1] {}", history.describe_stale(s));
    }
    for (n, list) in [(2, &inv2), (3, &inv3), (4, &herd_violations)] {
        for v in list.iter().take(5) {
            let _ = writeln!(text, "  [{n}] {v}");
        }
    }
    for p in &phantom_detail {
        let _ = writeln!(text, "  [phantom] {p}");
    }
    let _ = writeln!(
        text,
        "staleness (commit -> end of the first later-starting read that saw it or newer), \
         {} writes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {unseen} writes never seen \
         (overwritten before any read)",
        staleness.len(),
        ms(percentile(&staleness, 50.0)),
        ms(percentile(&staleness, 99.0)),
        ms(staleness.last().copied().unwrap_or(0)),
    );
    println!("{text}");
    Report {
        text,
        writes: writes_tally,
        reads: reads_tally,
        faults,
        violations,
        phantoms,
    }
}

/// Every `product:*` key, its value and its time to live.
async fn snapshot(
    conn: &mut redis::aio::MultiplexedConnection,
) -> BTreeMap<String, (String, Option<Duration>)> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("product:*")
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut out = BTreeMap::new();
    for key in keys {
        let (value, ttl): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(&key)
            .cmd("PTTL")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        if let Some(value) = value {
            let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
            out.insert(key, (value, ttl));
        }
    }
    out
}

/// Owns some items and writes them one call at a time, so it knows each item's history exactly.
async fn writer(
    shared: Arc<Shared>,
    owned: Vec<u16>,
    mut rng: fastrand::Rng,
    delete_probability: f64,
) -> Vec<Write> {
    // (last index, exists)
    let mut state: HashMap<u16, (u32, bool)> = owned.iter().map(|&i| (i, (0, false))).collect();
    let mut out = Vec::new();
    while shared.budget.take() {
        let item = owned[rng.usize(..owned.len())];
        let (last, exists) = state[&item];
        let index = last + 1;
        let kind = if !exists {
            WriteKind::Put
        } else if rng.f64() < delete_probability {
            WriteKind::Delete
        } else if rng.bool() {
            WriteKind::Put
        } else {
            WriteKind::Update
        };
        let id = &shared.items[item as usize];
        let version = Av::N(index.to_string());
        let price = Av::N(format!("{}.{:02}", index % 1000, index % 100));
        let start = shared.clock.now();
        match kind {
            WriteKind::Put => shared
                .dynamodb
                .put_item()
                .table_name(&shared.table)
                .item("productId", Av::S(id.clone()))
                .item("name", Av::S(format!("Product {id}")))
                .item("version", version)
                .item("price", price)
                .send()
                .await
                .map(drop)
                .map_err(aws_sdk_dynamodb::Error::from),
            WriteKind::Update => shared
                .dynamodb
                .update_item()
                .table_name(&shared.table)
                .key("productId", Av::S(id.clone()))
                .update_expression("SET version = :v, price = :p")
                .expression_attribute_values(":v", version)
                .expression_attribute_values(":p", price)
                .send()
                .await
                .map(drop)
                .map_err(aws_sdk_dynamodb::Error::from),
            WriteKind::Delete => shared
                .dynamodb
                .delete_item()
                .table_name(&shared.table)
                .key("productId", Av::S(id.clone()))
                .send()
                .await
                .map(drop)
                .map_err(aws_sdk_dynamodb::Error::from),
        }
        .unwrap_or_else(|e| panic!("{kind:?} #{index} of {id} failed: {e:?}"));
        let end = shared.clock.now();
        shared.budget.writes.fetch_add(1, Ordering::Relaxed);
        shared.budget.written.notify_waiters();
        state.insert(item, (index, kind != WriteKind::Delete));
        out.push(Write {
            item,
            index,
            kind,
            start,
            end,
        });
    }
    out
}

/// Reads random items through the real read path until the run is over.
async fn reader<S: ProductStore>(
    shared: Arc<Shared>,
    read_path: ReadPath<RedisCache, S>,
    mut rng: fastrand::Rng,
) -> Vec<Read> {
    let mut out = Vec::new();
    let phase = shared.phase.subscribe();
    while *phase.borrow() != Phase::Done {
        shared
            .budget
            .pace_reader(&phase, shared.items.len() as u64)
            .await;
        shared.budget.take();
        let item = rng.usize(..shared.items.len());
        let start = shared.clock.now();
        let (status, result) = read_path.get(&shared.items[item]).await;
        let end = shared.clock.now();
        let seen = match result {
            Ok(Lookup::Found(doc)) => Seen::Found(version_of(doc.as_str())),
            Ok(Lookup::NotFound) => Seen::NotFound,
            Err(_) => Seen::Error,
        };
        out.push(Read {
            item: item as u16,
            seen,
            status,
            start,
            end,
        });
    }
    out
}

/// The `version` of a cached or read document; 0 (never written) if it has none.
fn version_of(doc: &str) -> u32 {
    serde_json::from_str::<Value>(doc)
        .ok()
        .and_then(|d| d["version"].as_u64())
        .map_or(0, |v| v as u32)
}

/// `n` concurrent reads of a key nobody has read: returns a violation of invariant 4, if any.
async fn herd(
    redis_url: &str,
    settings: &CacheSettings,
    sdk: &aws_config::SdkConfig,
    table: &str,
    id: &str,
    n: usize,
) -> Option<String> {
    let cache = redis_cache(redis_url, settings).await;
    // After a restart the client reconnects on first use: wait until Redis answers through it,
    // so no herd read bypasses the cache for lack of a connection.
    let waiting = std::time::Instant::now();
    while let Err(e) = cache.get("checker:ping").await {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "redis did not come back: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = Counting::new(dynamo_store(sdk, table, settings));
    let read_path = Arc::new(ReadPath::new(cache, store, settings.clone()));
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let read_path = read_path.clone();
        let id = id.to_owned();
        set.spawn(async move { read_path.get(&id).await });
    }
    let mut statuses: HashMap<&'static str, usize> = HashMap::new();
    let mut wrong = 0;
    while let Some(joined) = set.join_next().await {
        let (status, result) = joined.expect("herd read task");
        *statuses.entry(status.as_str()).or_default() += 1;
        if !matches!(result, Ok(Lookup::NotFound)) {
            wrong += 1;
        }
    }
    let elapsed = started.elapsed();
    let reads = read_path.store().count();
    let allowed = 1 + (elapsed.as_nanos() / settings.lease.as_nanos()) as usize;
    (reads > allowed || wrong > 0 || statuses.contains_key(CacheStatus::Bypass.as_str())).then(
        || {
            format!(
                "{n} concurrent reads of {id} made {reads} table reads in {elapsed:?} \
                 (allowed {allowed}); answers {statuses:?}, {wrong} not `not found`"
            )
        },
    )
}

/// A stream record as the feeder tracks it.
struct Rec {
    value: Value,
    item: u16,
    index: u32,
    seq: String,
}

struct RecState {
    delete: bool,
    seq: String,
    deliveries: u32,
    acked: Option<Nanos>,
}

pub struct FeedOutcome {
    acks: Vec<Ack>,
    stats: Tally,
    drained: bool,
}

/// What Lambda's event source mapping does: reads the stream, forms batches, invokes the
/// invalidator, honours partial batch responses, bisects, and re-delivers (at least once).
struct Feeder {
    shared: Arc<Shared>,
    stream: StreamReader,
    iterator: String,
    invalidator: Invalidator<FailingCache<RedisCache>>,
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
    replay_after_restart: bool,
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
    async fn run(mut self, expected: watch::Receiver<Option<usize>>) -> FeedOutcome {
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
                if self.replay_after_restart {
                    self.pool.sort_by_key(|p| p.n);
                    let old: Vec<Vec<Arc<Rec>>> =
                        self.pool.iter().map(|p| p.batch.clone()).collect();
                    for batch in old {
                        self.stats.add("batches replayed after the restart", 1);
                        self.duplicate(&batch).await;
                    }
                }
            }
            if !self.pool.is_empty() && self.rng.f64() < self.duplicate_probability {
                // Any acknowledged batch, also one from before a restart (which forgot its
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
            let injected = self.rng.f64() < self.partial_failure_probability;
            if injected {
                let prefix = self.rng.usize(..n);
                self.invalidator.cache().arm(prefix);
                self.stats.add("partial failures", 1);
            }
            let response = self.invalidator.handle(event(&batch)).await;
            let at = clock.now();
            let unused = self.invalidator.cache().disarm();
            self.stats.add("batches", 1);
            self.stats.add("records delivered", n as u64);
            for r in &batch {
                self.records.get_mut(&(r.item, r.index)).unwrap().deliveries += 1;
            }
            // Lambda retries from the lowest sequence number reported; an empty one fails all.
            let failed_at = response
                .batch_item_failures
                .iter()
                .map(|f| match f.item_identifier.as_deref() {
                    None | Some("") => 0,
                    Some(seq) => batch.iter().position(|r| r.seq == seq).unwrap_or(0),
                })
                .min();
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
        FeedOutcome {
            acks,
            stats: self.stats,
            drained,
        }
    }

    /// Re-delivers an acknowledged batch. Its answer does not matter.
    async fn duplicate(&mut self, batch: &[Arc<Rec>]) {
        self.stats.add("duplicate records", batch.len() as u64);
        for r in batch {
            self.records.get_mut(&(r.item, r.index)).unwrap().deliveries += 1;
        }
        let _ = self.invalidator.handle(event(batch)).await;
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
                    seq: seq.clone(),
                    deliveries: 0,
                    acked: None,
                },
            );
            assert!(
                previous.is_none(),
                "two stream records for {id} #{index}: {value}"
            );
            self.pending.push_back(Arc::new(Rec {
                value,
                item,
                index,
                seq,
            }));
        }
    }
}

fn event(batch: &[Arc<Rec>]) -> Value {
    lambda_event(batch.iter().map(|r| r.value.clone()).collect())
}
