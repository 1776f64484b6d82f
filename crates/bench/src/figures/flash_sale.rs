//! The flash sale: the real local system (moto's table and stream, the local event source
//! mapping with the invalidator on it), a Zipf-distributed catalog read by 64 concurrent
//! readers through the read path (each its own client, as 64 Lambda environments would be),
//! and 1% of operations writing a price change with an increasing `version` to the table.
//!
//! A fifth of the readers are batch readers: each of their requests reads 20 distinct products
//! (`GET /products?ids=...`, through `ReadPath::get_many`), each product one read of the figure.
//!
//! Judged: DynamoDB reads (items read: one per `GetItem`, one per id of a `BatchGetItem`,
//! counted around the store) against distinct keys plus writes; the hit ratio over reads after each key's first (that first read is a miss for any
//! cache); and staleness: a read that returns a version older than one whose write had
//! returned more than 1 s before the read started is a violation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use local_stack::poller::{BatchFunction, Poller, StartingPosition};
use local_stack::stream::StreamReader;
use product_cache::cache::RedisCache;
use product_cache::config::{CacheSettings, InvalidationMode, InvalidatorSettings, RedisSettings};
use product_cache::id::KeyType;
use product_cache::invalidate::Invalidator;
use product_cache::read::{BatchIds, CacheStatus, Lookup, ReadPath};
use product_cache::store::DynamoStore;
use serde_json::Value;

use crate::counting::{Counting, Counts, TableReads};
use crate::env::Env;
use crate::report::{Budget, Net, Row, Unit};
use crate::{Error, Sizes};

const STALE_AFTER: Duration = Duration::from_secs(1);
/// Every this many readers, one is a batch reader.
const BATCH_READER_EVERY: usize = 5;
/// Distinct products per batch request.
const BATCH_SIZE: usize = 20;

/// The invalidator, noting for every record when it was applied (epoch seconds) and how long
/// after its change: the stream-to-cache lag (moto's `ApproximateCreationDateTime` to the end of
/// the invocation). The game day reads it by stretch of time too.
pub(crate) struct Timed<F> {
    pub inner: F,
    pub lags: Mutex<Vec<(f64, f64)>>,
}

impl<F> Timed<F> {
    pub fn new(inner: F) -> Self {
        Self {
            inner,
            lags: Mutex::default(),
        }
    }

    /// Every lag so far, in ms.
    pub(crate) fn lags_ms(&self) -> Vec<f64> {
        self.lags
            .lock()
            .unwrap()
            .iter()
            .map(|(_, lag)| *lag)
            .collect()
    }
}

impl<F: BatchFunction> BatchFunction for Timed<F> {
    async fn invoke(&self, event: Value) -> Result<Value, String> {
        let created: Vec<f64> = event["Records"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["dynamodb"]["ApproximateCreationDateTime"].as_f64())
            .collect();
        let out = self.inner.invoke(event).await;
        let now = crate::records::now_secs();
        self.lags
            .lock()
            .unwrap()
            .extend(created.iter().map(|c| (now, (now - c) * 1e3)));
        out
    }
}

/// Runs `poller` in a task of its own until the sender returned is used (or dropped).
pub(crate) fn in_background<F: BatchFunction + Send + Sync + 'static>(
    poller: &Arc<Poller<F>>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), local_stack::poller::PollerError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let poller = Arc::clone(poller);
    let polling = tokio::spawn(async move {
        poller
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, polling)
}

/// The seeded catalog.
pub struct Sale {
    table: String,
    stream_arn: String,
    ids: Vec<String>,
}

pub async fn prepare(env: &Env, sizes: &Sizes) -> Result<(Sale, Duration), Error> {
    let table = format!("bench-sale-{}", std::process::id());
    let products = local_stack::seed::catalog(sizes.sale_products);
    let (stream_arn, took) = seeded_table(env, &table, &products).await?;
    let ids = products.into_iter().map(|p| p.id).collect();
    Ok((
        Sale {
            table,
            stream_arn,
            ids,
        },
        took,
    ))
}

/// A new table holding `products`, written by 4 tasks of parallel `BatchWriteItem`s, then its
/// stream turned on; returns the stream's ARN and how long the writes took.
pub(crate) async fn seeded_table(
    env: &Env,
    table: &str,
    products: &[local_stack::seed::Product],
) -> Result<(String, Duration), Error> {
    // The stream is enabled after seeding: moto keeps every stream record in memory, and 100,000
    // INSERTs nobody reads would only lengthen its garbage collections.
    create_table_without_stream(env, table).await?;
    let started = Instant::now();
    // seed::batch_write keeps 4 BatchWriteItems in flight; 4 of them at once keep moto busy.
    let items: Vec<_> = products.iter().map(|p| p.item("productId")).collect();
    let per_task = items.len().div_ceil(4).max(1);
    let mut writers = tokio::task::JoinSet::new();
    for chunk in items.chunks(per_task) {
        let (client, table, chunk) = (env.dynamodb.clone(), table.to_owned(), chunk.to_vec());
        writers.spawn(async move { local_stack::seed::batch_write(&client, &table, chunk).await });
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }
    let took = started.elapsed();
    Ok((enable_stream(env, table).await?, took))
}

async fn create_table_without_stream(env: &Env, table: &str) -> Result<(), Error> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    env.dynamodb
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("productId")
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("productId")
                .key_type(KeyType::Hash)
                .build()?,
        )
        .send()
        .await?;
    Ok(())
}

/// Turns on a `NEW_AND_OLD_IMAGES` stream, as the template declares, and returns its ARN.
async fn enable_stream(env: &Env, table: &str) -> Result<String, Error> {
    use aws_sdk_dynamodb::types::{StreamSpecification, StreamViewType};
    env.dynamodb
        .update_table()
        .table_name(table)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewAndOldImages)
                .build()?,
        )
        .send()
        .await?;
    Ok(local_stack::table::ensure_table(
        &env.dynamodb,
        table,
        "productId",
        product_cache::id::KeyType::S,
    )
    .await?)
}

/// Cumulative Zipf weights over ranks 1..=n.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cumulative = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 1..=n {
            total += (rank as f64).powf(-s);
            cumulative.push(total);
        }
        for c in &mut cumulative {
            *c /= total;
        }
        Self { cumulative }
    }

    /// A rank, 0-based.
    fn sample(&self, rng: &mut fastrand::Rng) -> usize {
        let u = rng.f64();
        self.cumulative
            .partition_point(|&c| c < u)
            .min(self.cumulative.len() - 1)
    }
}

struct ReadRecord {
    product: u32,
    started: Instant,
    version: Option<u64>,
    status: CacheStatus,
}

struct WriteRecord {
    product: u32,
    returned: Instant,
    version: u64,
}

fn version_of(lookup: &Lookup) -> Option<u64> {
    match lookup {
        Lookup::Found(doc) => serde_json::from_str::<serde_json::Value>(doc.as_str())
            .ok()?
            .get("version")?
            .as_u64(),
        Lookup::NotFound => None,
    }
}

pub async fn run(
    env: &Env,
    sizes: &Sizes,
    net: Net,
    sale: &Sale,
    mode: InvalidationMode,
) -> Result<Vec<Row>, Error> {
    env.flushall().await?;
    // A refresh from a record created before Redis started (less the clock margin) deletes.
    env.wait_uptime(4).await?;
    let url = env.url(net);
    let settings = CacheSettings {
        version_attribute: Some("version".into()),
        ..CacheSettings::default()
    };

    // The invalidator on the table's stream, through the mapping the SAM template declares.
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../infra/template.yaml");
    let mut esm = local_stack::esm_template::local(&template)?.config;
    esm.starting_position = StartingPosition::Latest;
    esm.on_failure = None;
    let esm_text = format!(
        "batch size {}, window {:?}, polled every {:?}",
        esm.batch_size, esm.batching_window, esm.poll_interval
    );
    let invalidator = Invalidator::build(
        InvalidatorSettings {
            redis: RedisSettings::new(&url),
            mode,
            cache: settings.clone(),
        },
        &env.sdk,
    )
    .await?;
    // A long-running deployment's slots have had their epochs for long: refreshes write.
    invalidator.cache().declare_empty().await?;
    let reader = StreamReader::new(
        aws_sdk_dynamodbstreams::Client::new(&env.sdk),
        &sale.stream_arn,
    );
    let poller = Arc::new(Poller::new(reader, esm, Timed::new(invalidator)));
    let poller_stats = poller.stats();
    let (stop, polling) = in_background(&poller);
    let deadline = Instant::now() + Duration::from_secs(30);
    while poller_stats.polls.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            return Err("the stream poller never read the stream".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 64 read-path instances, one per reader, like 64 Lambda environments.
    let counts = Arc::new(Counts::default());
    let read_settings = env.read_settings(net, &sale.table, settings.clone());
    let mut readers = Vec::with_capacity(sizes.sale_readers);
    for _ in 0..sizes.sale_readers {
        let cache = RedisCache::from_settings(&read_settings.redis, &settings, &env.sdk).await?;
        let store = Counting::new(
            DynamoStore::from_settings(&read_settings, &env.sdk),
            counts.clone(),
        );
        readers.push(Arc::new(ReadPath::new(cache, store, settings.clone())));
    }
    let batch_readers = sizes.sale_readers.div_ceil(BATCH_READER_EVERY);

    let zipf = Arc::new(Zipf::new(sale.ids.len(), sizes.sale_zipf_s));
    // Ranks map to products through a seeded shuffle, so the hot ones are spread over the
    // catalog's categories.
    let mut order: Vec<u32> = (0..sale.ids.len() as u32).collect();
    fastrand::Rng::with_seed(7).shuffle(&mut order);
    let order = Arc::new(order);
    let ids = Arc::new(sale.ids.clone());
    let reads_left = Arc::new(AtomicUsize::new(sizes.sale_reads));
    let write_errors = Arc::new(AtomicU64::new(0));
    let reads_log = Arc::new(Mutex::new(Vec::with_capacity(sizes.sale_reads)));
    let writes_log = Arc::new(Mutex::new(Vec::new()));
    // Writes are this share of all operations.
    let write_chance = sizes.sale_write_share / (1.0 - sizes.sale_write_share);

    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for (n, read) in readers.into_iter().enumerate() {
        let (zipf, order, ids) = (zipf.clone(), order.clone(), ids.clone());
        let (reads_left, write_errors) = (reads_left.clone(), write_errors.clone());
        let (reads_log, writes_log) = (reads_log.clone(), writes_log.clone());
        let (dynamodb, table) = (env.dynamodb.clone(), sale.table.clone());
        workers.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(1000 + n as u64);
            let (mut my_reads, mut my_writes) = (Vec::new(), Vec::new());
            loop {
                let product = order[zipf.sample(&mut rng)];
                let id = &ids[product as usize];
                if rng.f64() < write_chance {
                    let price = format!("{}.{:02}", rng.u32(10..500), rng.u32(0..100));
                    match local_stack::seed::set_price(&dynamodb, &table, "productId", id, &price)
                        .await
                    {
                        Ok(change) => {
                            let returned = Instant::now();
                            if let Some(version) = change.version.and_then(|v| v.parse().ok()) {
                                my_writes.push(WriteRecord {
                                    product,
                                    returned,
                                    version,
                                });
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "flash-sale write failed");
                            write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    continue;
                }
                let batch = n % BATCH_READER_EVERY == 0;
                let want = if batch { BATCH_SIZE } else { 1 };
                let Ok(left) =
                    reads_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                        (left > 0).then(|| left.saturating_sub(want))
                    })
                else {
                    break;
                };
                let read_started = Instant::now();
                if !batch {
                    let (status, result) = read.get(id).await;
                    my_reads.push(ReadRecord {
                        product,
                        started: read_started,
                        version: result.as_ref().ok().and_then(version_of),
                        status,
                    });
                    continue;
                }
                // The product drawn first and more, until the request has as many distinct
                // products as the reads it took.
                let mut products = vec![product];
                for _ in 0..100 * want {
                    if products.len() == want.min(left) {
                        break;
                    }
                    let more = order[zipf.sample(&mut rng)];
                    if !products.contains(&more) {
                        products.push(more);
                    }
                }
                let query = products
                    .iter()
                    .map(|&p| ids[p as usize].as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                let batch_ids = BatchIds::parse(Some(&format!("ids={query}")), KeyType::S)
                    .expect("the catalog's ids are valid and need no encoding");
                let answer = read.get_many(&batch_ids).await;
                for (&product, entry) in products.iter().zip(&answer.entries) {
                    my_reads.push(ReadRecord {
                        product,
                        started: read_started,
                        version: entry.result.as_ref().ok().and_then(version_of),
                        status: entry.status,
                    });
                }
            }
            reads_log.lock().unwrap().extend(my_reads);
            writes_log.lock().unwrap().extend(my_writes);
        });
    }
    while let Some(done) = workers.join_next().await {
        done?;
    }
    let elapsed = started.elapsed();
    let _ = stop.send(());
    let _ = polling.await;

    let reads = std::mem::take(&mut *reads_log.lock().unwrap());
    let writes = std::mem::take(&mut *writes_log.lock().unwrap());
    let table_reads = counts.now();
    Ok(judge(
        net,
        mode,
        &reads,
        &writes,
        table_reads,
        batch_readers,
        elapsed,
        write_errors.load(Ordering::Relaxed),
        &esm_text,
        &format!(
            "{} records applied ({} function errors, {} partial failures, {} given up); change to cache {}; slowest table read {:.0} ms",
            poller_stats.records_acknowledged.load(Ordering::Relaxed),
            poller_stats.function_errors.load(Ordering::Relaxed),
            poller_stats.partial_failures.load(Ordering::Relaxed),
            poller_stats.records_given_up.load(Ordering::Relaxed),
            lag_summary(&poller.function().lags_ms()),
            table_reads.slowest_us as f64 / 1e3,
        ),
    ))
}

/// `p50 x ms, p99 y ms, max z ms` of the stream-to-cache lags.
pub(crate) fn lag_summary(lags_ms: &[f64]) -> String {
    let mut sorted = lags_ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    format!(
        "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        crate::stats::percentile(&sorted, 0.5),
        crate::stats::percentile(&sorted, 0.99),
        crate::stats::percentile(&sorted, 1.0)
    )
}

#[allow(clippy::too_many_arguments)]
fn judge(
    net: Net,
    mode: InvalidationMode,
    reads: &[ReadRecord],
    writes: &[WriteRecord],
    table: TableReads,
    batch_readers: usize,
    elapsed: Duration,
    write_errors: u64,
    esm: &str,
    invalidator: &str,
) -> Vec<Row> {
    let mut statuses: HashMap<&'static str, u64> = HashMap::new();
    for r in reads {
        *statuses.entry(r.status.as_str()).or_default() += 1;
    }
    let hits = statuses.get("hit").copied().unwrap_or(0);
    // Each key's first read (by start time) is a miss for any cache; the ratio is over the rest.
    let mut in_order: Vec<&ReadRecord> = reads.iter().collect();
    in_order.sort_by_key(|r| (r.product, r.started));
    let (mut distinct, mut later, mut later_hits) = (0u64, 0u64, 0u64);
    for (i, r) in in_order.iter().enumerate() {
        if i > 0 && in_order[i - 1].product == r.product {
            later += 1;
            later_hits += u64::from(r.status == CacheStatus::Hit);
        } else {
            distinct += 1;
        }
    }
    let total = reads.len() as u64;

    // Per product, writes by the time they returned, with the highest version returned so far.
    let mut by_product: HashMap<u32, Vec<(Instant, u64)>> = HashMap::new();
    for w in writes {
        by_product
            .entry(w.product)
            .or_default()
            .push((w.returned, w.version));
    }
    for list in by_product.values_mut() {
        list.sort_by_key(|(t, _)| *t);
        let mut max = 0;
        for entry in list.iter_mut() {
            max = max.max(entry.1);
            entry.1 = max;
        }
    }
    let (mut checked, mut stale) = (0u64, 0u64);
    let mut first_stale = None;
    // How long after the newer version's write returned the latest stale read started.
    let mut worst = Duration::ZERO;
    for r in reads {
        let (Some(list), Some(version)) = (by_product.get(&r.product), r.version) else {
            continue;
        };
        let Some(cutoff) = r.started.checked_sub(STALE_AFTER) else {
            continue;
        };
        let known = list.partition_point(|(t, _)| *t <= cutoff);
        if known == 0 {
            continue;
        }
        checked += 1;
        let must_see = list[known - 1].1;
        if version < must_see {
            stale += 1;
            first_stale.get_or_insert((r.product, version, must_see));
            let newer_since = list[list.partition_point(|(_, v)| *v <= version)].0;
            worst = worst.max(r.started.saturating_duration_since(newer_since));
        }
    }

    let mode_text = match mode {
        InvalidationMode::Delete => "delete mode",
        InvalidationMode::Refresh => "refresh mode",
    };
    let rate = total as f64 / elapsed.as_secs_f64();
    let writes_n = writes.len() as u64;
    let status_text = {
        let mut parts: Vec<String> = statuses.iter().map(|(k, v)| format!("{k} {v}")).collect();
        parts.sort();
        parts.join(", ")
    };
    let write_failure =
        (write_errors > 0).then(|| format!("{write_errors} writes to the table failed"));
    vec![
        Row {
            figure: "flash-sale",
            what: "DynamoDB reads (items, GetItem and BatchGetItem)".into(),
            net,
            judged_on: "counted around the store",
            unit: Unit::Count,
            measured: table.items() as f64,
            baseline: Some((distinct + writes_n) as f64),
            baseline_label: format!("{distinct} distinct keys + {writes_n} writes"),
            budget: Budget::AtMost((distinct + writes_n) as f64),
            note: format!(
                "{total} reads by 64 readers ({batch_readers} of them batch readers, {BATCH_SIZE} products a request) in {:.1} s ({rate:.0}/s), {mode_text}, VERSION_ATTRIBUTE=version; {status_text}; the table: {} GetItems, {} BatchGetItems of {} ids",
                elapsed.as_secs_f64(),
                table.gets,
                table.batches,
                table.batch_ids,
            ),
            failure: write_failure.clone(),
        },
        Row {
            figure: "flash-sale",
            what: "hit ratio after each key's first read".into(),
            net,
            judged_on: "X-Cache of every read",
            unit: Unit::Percent,
            measured: later_hits as f64 * 100.0 / later.max(1) as f64,
            baseline: None,
            baseline_label: format!("{later} reads after their key's first"),
            budget: Budget::Above(99.0),
            note: format!(
                "all reads: {:.2} % hits (the first reads of {distinct} keys are cold)",
                hits as f64 * 100.0 / total.max(1) as f64
            ),
            failure: None,
        },
        Row {
            figure: "flash-sale",
            what: "reads staler than 1 s".into(),
            net,
            judged_on: "versions read vs written",
            unit: Unit::Count,
            measured: stale as f64,
            baseline: None,
            baseline_label: format!("{checked} reads after a write older than 1 s"),
            budget: Budget::AtMost(0.0),
            note: match first_stale {
                Some((p, got, want)) => format!(
                    "e.g. product #{p} read at version {got}, {want} written over 1 s before; the stalest read started {:.2} s after the newer write; stream: {esm}; {invalidator}",
                    worst.as_secs_f64()
                ),
                None => format!("stream: {esm}; {invalidator}"),
            },
            failure: None,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_samples_favour_low_ranks() {
        let zipf = Zipf::new(1000, 1.1);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[zipf.sample(&mut rng)] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[9] && counts[9] > counts[999]);
        // Rank 1 of 1000 at s = 1.1 carries about 17% of the weight.
        assert!((15_000..19_000).contains(&counts[0]), "{}", counts[0]);
    }

    #[test]
    fn a_read_is_stale_only_after_a_write_older_than_a_second() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let writes = [WriteRecord {
            product: 1,
            returned: at(1000),
            version: 2,
        }];
        let read = |ms, version| ReadRecord {
            product: 1,
            started: at(ms),
            version: Some(version),
            status: CacheStatus::Hit,
        };
        let reads = [read(1500, 1), read(2100, 2), read(2200, 1)];
        let rows = judge(
            Net::Loopback,
            InvalidationMode::Delete,
            &reads,
            &writes,
            TableReads {
                gets: 1,
                ..TableReads::default()
            },
            0,
            Duration::from_secs(3),
            0,
            "",
            "",
        );
        assert_eq!(rows[2].measured, 1.0, "only the read at 2.2 s is stale");
        assert!(rows[2].baseline_label.starts_with("2 reads"));
    }
}
