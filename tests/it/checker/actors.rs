//! The actors that drive a run: writers that own the items, readers on the real read path, and
//! what they share (the operation budget, the phase, which generation of the Redis data is up,
//! which version attribute setting each function uses).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue as Av;
use product_cache::cache::RedisCache;
use product_cache::read::{BatchAnswer, BatchIds, Lookup, ReadError, ReadPath};
use product_cache::store::ProductStore;
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::config::Config;
use super::faults::SlowStore;
use super::history::{Batch, Clock, Nanos, Read, Seen, Write, WriteKind};
use super::system::Sut;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Writers have stopped; the feeder drains the stream, readers keep reading.
    Draining,
    Done,
}

/// The operation budget, shared by readers and writers, and the pace of the readers.
pub struct Budget {
    issued: AtomicU64,
    total: u64,
    pub writes: AtomicU64,
    pub reads: AtomicU64,
    reads_per_write: u64,
    /// Signalled after every write, and when the writers stop.
    pub written: Notify,
    /// When the budget ends whatever is left of it ([`Budget::end_now`] brings it forward).
    deadline: AtomicU64,
    /// When the budget began.
    start: Nanos,
    clock: Clock,
    /// Percent of the budget used, for the chaos schedule: of the operations or of the time,
    /// whichever is further along.
    progress: watch::Sender<u64>,
}

impl Budget {
    pub fn take(&self) -> bool {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let (now, deadline) = (self.clock.now(), self.deadline.load(Ordering::Relaxed));
        // Time counts as well as operations: on a machine slowed down (a loaded CI host ran
        // these at half the speed) the deadline would otherwise cut the run before the chaos
        // due late in it, and skip it. By time, each event comes at its share of the deadline.
        let by_time = (now.saturating_sub(self.start) as u128 * 100
            / deadline.saturating_sub(self.start).max(1) as u128) as u64;
        let pct = if n >= self.total || now > deadline {
            100
        } else {
            ((n + 1) * 100 / self.total).max(by_time.min(99))
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

    /// Ends the budget now: the next `take` is refused (a run that lasts by time).
    pub fn end_now(&self) {
        self.deadline.store(self.clock.now(), Ordering::Relaxed);
    }

    /// Readers keep to `reads_per_write` reads per write while the writers run (plus a slack of
    /// a few reads per item), so a run's operations are a mix of both whatever the speeds.
    pub async fn pace_reader(&self, phase: &watch::Receiver<Phase>, items: u64) {
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

/// Which data Redis holds: `begun` counts data losses (restarts or `FLUSHALL`s) started, `done`
/// those finished. A batch applied while both equal `g` lives in generation `g` of the data.
#[derive(Default)]
pub struct Generation {
    pub begun: AtomicU64,
    pub done: AtomicU64,
}

impl Generation {
    /// The generation now, or `None` while a data loss is under way.
    pub fn current(&self) -> Option<u64> {
        let done = self.done.load(Ordering::SeqCst);
        (self.begun.load(Ordering::SeqCst) == done).then_some(done)
    }
}

/// Which functions use the flipped version attribute setting (`Sut::flipped`) from now on.
#[derive(Default)]
pub struct Flipped {
    pub invalidator: AtomicBool,
    pub readers: AtomicBool,
    /// Reads made with the flipped setting.
    pub reads: AtomicU64,
}

/// What every actor shares.
pub struct Shared {
    pub generation: Generation,
    pub flipped: Flipped,
    /// Records acknowledged so far, for progress lines.
    pub acked: AtomicU64,
    pub clock: Clock,
    pub budget: Budget,
    pub phase: watch::Sender<Phase>,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub table: String,
    pub items: Vec<String>,
}

impl Shared {
    /// `progress` gets the percent of the budget used.
    pub fn new(cfg: &Config, clock: Clock, progress: watch::Sender<u64>, sut: &Sut) -> Self {
        let (phase, _) = watch::channel(Phase::Running);
        let start = clock.now();
        Self {
            generation: Generation::default(),
            flipped: Flipped::default(),
            acked: AtomicU64::new(0),
            clock,
            budget: Budget {
                issued: AtomicU64::new(0),
                total: cfg.ops.max(1),
                writes: AtomicU64::new(0),
                reads: AtomicU64::new(0),
                reads_per_write: cfg.reads_per_write,
                written: Notify::new(),
                deadline: AtomicU64::new(start + cfg.max_duration.as_nanos() as Nanos),
                start,
                clock,
                progress,
            },
            phase,
            dynamodb: sut.dynamodb.clone(),
            table: sut.table.clone(),
            items: (0..cfg.items).map(|i| format!("item-{i:02}")).collect(),
        }
    }
}

/// One writer per share of the items (item `i` goes to writer `i % writers`).
pub fn spawn_writers(cfg: &Config, shared: &Arc<Shared>) -> Vec<JoinHandle<Vec<Write>>> {
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
            cfg.write_pause,
        )));
    }
    writers
}

pub struct Readers {
    pub tasks: Vec<JoinHandle<Vec<Read>>>,
    /// Products read from the table by all readers, how many table reads were slowed, and how
    /// many were `BatchGetItem`s.
    pub table_reads: Arc<AtomicU64>,
    pub slowed: Arc<AtomicU64>,
    pub batch_table_reads: Arc<AtomicU64>,
}

/// How a reader asks.
#[derive(Debug, Clone, Copy)]
enum Asks {
    /// One product per request (`GET /products/{id}`).
    One,
    /// Many per request (`GET /products?ids=...`): `ids` drawn from the items, and how often
    /// the answer comes before the fills.
    Many {
        ids: (usize, usize),
        answer_first_probability: f64,
    },
}

/// Readers over their own cache clients and slowed table stores, the last
/// `batch_readers` of them reading in batches. In a run that flips the version
/// attribute, each reader also has a read path with the flipped settings (a client of its own,
/// the same store), built up front and used once `Flipped::readers` is set.
pub async fn spawn_readers(cfg: &Config, sut: &Sut, shared: &Arc<Shared>) -> Readers {
    assert!(
        cfg.batch_readers <= cfg.readers && cfg.batch_ids.0 >= 1,
        "{} batch readers of {}, {:?} ids each",
        cfg.batch_readers,
        cfg.readers,
        cfg.batch_ids
    );
    let mut readers = Vec::new();
    let table_reads = Arc::new(AtomicU64::new(0));
    let slowed = Arc::new(AtomicU64::new(0));
    let batch_table_reads = Arc::new(AtomicU64::new(0));
    for r in 0..cfg.readers {
        let asks = if r >= cfg.readers - cfg.batch_readers {
            Asks::Many {
                ids: cfg.batch_ids,
                answer_first_probability: cfg.batch_answer_first_probability,
            }
        } else {
            Asks::One
        };
        let store = SlowStore {
            inner: sut.store(),
            rng: Arc::new(Mutex::new(fastrand::Rng::with_seed(
                cfg.seed.wrapping_add(1000 + r as u64),
            ))),
            probability: cfg.slow_read_probability,
            pause: cfg.slow_read_pause,
            reads: table_reads.clone(),
            slowed: slowed.clone(),
            batches: batch_table_reads.clone(),
        };
        let flipped = match cfg.flip_version_attribute {
            Some(_) => {
                Some(sut.read_path(sut.cache(&sut.flipped).await, store.clone(), &sut.flipped))
            }
            None => None,
        };
        let read_path = sut.read_path(sut.cache(&sut.settings).await, store, &sut.settings);
        let rng = fastrand::Rng::with_seed(cfg.seed.wrapping_add(2000 + r as u64));
        readers.push(tokio::spawn(reader(
            shared.clone(),
            r as u16,
            read_path,
            flipped,
            asks,
            rng,
        )));
    }
    Readers {
        tasks: readers,
        table_reads,
        slowed,
        batch_table_reads,
    }
}

/// Owns some items and writes them one call at a time, so it knows each item's history exactly.
async fn writer(
    shared: Arc<Shared>,
    owned: Vec<u16>,
    mut rng: fastrand::Rng,
    delete_probability: f64,
    pause: Option<Duration>,
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
        let start = shared.clock.now();
        match kind {
            WriteKind::Put => put(&shared, id, index).await,
            WriteKind::Update => shared
                .dynamodb
                .update_item()
                .table_name(&shared.table)
                .key("productId", Av::S(id.clone()))
                .update_expression("SET version = :v, price = :p")
                .expression_attribute_values(":v", Av::N(index.to_string()))
                .expression_attribute_values(":p", price_of(index))
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
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    out
}

/// A `PutItem` of item `id` at `index`: its `version`, and a price derived from it.
pub async fn put(shared: &Shared, id: &str, index: u32) -> Result<(), aws_sdk_dynamodb::Error> {
    shared
        .dynamodb
        .put_item()
        .table_name(&shared.table)
        .item("productId", Av::S(id.to_owned()))
        .item("name", Av::S(format!("Product {id}")))
        .item("version", Av::N(index.to_string()))
        .item("price", price_of(index))
        .send()
        .await
        .map(drop)
        .map_err(aws_sdk_dynamodb::Error::from)
}

fn price_of(index: u32) -> Av {
    Av::N(format!("{}.{:02}", index % 1000, index % 100))
}

/// Reads random items through the real read path until the run is over (through `flipped` once
/// the readers' version attribute has flipped), one per request or many.
async fn reader<S: ProductStore>(
    shared: Arc<Shared>,
    id: u16,
    read_path: ReadPath<RedisCache, S>,
    flipped: Option<ReadPath<RedisCache, S>>,
    asks: Asks,
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
        let read_path = match &flipped {
            Some(flipped) if shared.flipped.readers.load(Ordering::SeqCst) => {
                shared.flipped.reads.fetch_add(1, Ordering::Relaxed);
                flipped
            }
            _ => &read_path,
        };
        match asks {
            Asks::One => {
                let item = rng.usize(..shared.items.len());
                let start = shared.clock.now();
                let (status, result) = read_path.get(&shared.items[item]).await;
                let end = shared.clock.now();
                out.push(Read {
                    reader: id,
                    item: item as u16,
                    seen: seen(result),
                    status,
                    start,
                    end,
                    batch: None,
                });
            }
            Asks::Many {
                ids,
                answer_first_probability,
            } => {
                let n = rng.usize(ids.0..=ids.1);
                let drawn: Vec<&str> = (0..n)
                    .map(|_| shared.items[rng.usize(..shared.items.len())].as_str())
                    .collect();
                let ids = BatchIds::parse(
                    Some(&format!("ids={}", drawn.join(","))),
                    read_path.settings().key_type,
                )
                .expect("the items' ids make a valid batch");
                let answer_first = rng.f64() < answer_first_probability;
                let start = shared.clock.now();
                let (answer, end) = batch_read(read_path, &ids, answer_first, shared.clock).await;
                let batch = Batch {
                    size: answer.entries.len() as u16,
                    answered_first: answer_first,
                };
                for entry in answer.entries {
                    let item = shared
                        .items
                        .iter()
                        .position(|i| i == entry.id.as_str())
                        .expect("an item the batch asked for");
                    out.push(Read {
                        reader: id,
                        item: item as u16,
                        seen: seen(entry.result),
                        status: entry.status,
                        start,
                        end,
                        batch: Some(batch),
                    });
                }
            }
        }
    }
    out
}

/// One batch request, and when its answer was known: answered first and filled after the
/// answer (the Lambda function, whose extension runs the after-work before the environment's
/// next request), or filled before the answer.
async fn batch_read<S: ProductStore>(
    read_path: &ReadPath<RedisCache, S>,
    ids: &BatchIds,
    answer_first: bool,
    clock: Clock,
) -> (BatchAnswer, Nanos) {
    if answer_first {
        let (answer, after) = read_path.answer_many(ids).await;
        let end = clock.now();
        after.await;
        (answer, end)
    } else {
        let answer = read_path.get_many(ids).await;
        (answer, clock.now())
    }
}

fn seen(result: Result<Lookup, ReadError>) -> Seen {
    match result {
        Ok(Lookup::Found(doc)) => Seen::Found(version_of(doc.as_str())),
        Ok(Lookup::NotFound) => Seen::NotFound,
        Err(_) => Seen::Error,
    }
}

/// The `version` of a cached or read document; 0 (never written) if it has none.
fn version_of(doc: &str) -> u32 {
    serde_json::from_str::<Value>(doc)
        .ok()
        .and_then(|d| d["version"].as_u64())
        .map_or(0, |v| v as u32)
}
