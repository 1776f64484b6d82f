//! Batch reads (`GET /products?ids=...`) of 50 products, on the single node and on a 3-node
//! cluster, each against its raw equivalent in the same run. The product is measured through
//! [`ReadPath::answer_many`]: the read function's batch path up to its answer, without the
//! HTTP framing, as the hit-latency figure measures `ReadPath::get`.
//!
//! - `batch-read`, all hits: latency against a raw `MGET` of the same keys on a connection
//!   manager (on the cluster, a pipeline of `GET`s per node through that node's proxy, the nodes
//!   in parallel: the fewest round trips a client can spend by hand); the busiest node's round
//!   trips; and the same 50 products read one after another with `ReadPath::answer`.
//! - `batch-read-miss`, all misses: the `BatchGetItem`s (one), counted around the store, and
//!   the Redis round trips before the answer (at most 2 per node: the hits' reads, then the
//!   leases), against a plain cache-aside batch miss (the same `GET`s, one `BatchGetItem`, the
//!   `SET`s after the answer). The fills run after the answer, outside the timed section, as
//!   the miss-latency figure has it.
//!
//! Round trips are judged through the delaying proxies only: with no delay a node's replies
//! can come back between a client's sends, which a proxy then counts as more round trips.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use local_stack::services::RedisCluster;
use product_cache::cache::RedisCache;
use product_cache::config::{CacheSettings, ReadSettings, RedisSettings};
use product_cache::document::Document;
use product_cache::id::KeyType;
use product_cache::read::{BatchAnswer, BatchIds, CacheStatus, Lookup, ReadPath};
use product_cache::store::DynamoStore;
use redis::aio::ConnectionManager;

use crate::compare::{
    alternate, timed, trips_since, Compare, Cost, Counted, Order, Samples, ThroughProxy, PRODUCT,
};
use crate::counting::{Counting, Counts, TableReads};
use crate::env::{connection_manager, Env};
use crate::records::{image, item_of};
use crate::report::{Budget, Net, Row, Unit};
use crate::{Error, Sizes};

/// Products per request.
pub const PRODUCTS: usize = 50;
/// Requests per block of [`alternate`].
const BLOCK: usize = 20;
/// The raw baseline's side in [`alternate`], after the product's.
const RAW: usize = 1;

type Read = ReadPath<RedisCache, Counting>;

/// Where Redis is: the environment's single node, or the cluster behind its proxies.
#[derive(Clone, Copy)]
enum Topology<'a> {
    Single(&'a Env),
    Cluster(&'a RedisCluster),
}

impl Counted for Topology<'_> {
    fn counts(&self) -> Vec<u64> {
        match self {
            Topology::Single(env) => env.counts(),
            Topology::Cluster(cluster) => cluster.counts(),
        }
    }
}

impl Topology<'_> {
    fn label(self) -> &'static str {
        match self {
            Topology::Single(_) => "single node",
            Topology::Cluster(_) => "3-node cluster",
        }
    }

    /// The baseline, for the labels.
    fn raw_label(self) -> &'static str {
        match self {
            Topology::Single(_) => "raw MGET of the 50 keys",
            Topology::Cluster(_) => "raw GET pipeline per node, nodes in parallel",
        }
    }

    /// The cluster's proxies delay as the network says (the single node has a direct URL and a
    /// proxied one).
    fn set_delay(self, env: &Env, net: Net) {
        if let Topology::Cluster(cluster) = self {
            cluster.set_delay(match net {
                Net::Loopback => Duration::ZERO,
                Net::Proxy => env.delay(),
            });
        }
    }

    fn redis_settings(self, net: Net) -> RedisSettings {
        match self {
            Topology::Single(env) => RedisSettings::new(env.url(net)),
            Topology::Cluster(cluster) => RedisSettings {
                cluster: true,
                ..RedisSettings::new(cluster.url())
            },
        }
    }

    /// Empties every node, straight to it (not through a proxy).
    async fn flushall(self) -> Result<(), Error> {
        match self {
            Topology::Single(env) => env.flushall().await,
            Topology::Cluster(cluster) => {
                for port in cluster.ports() {
                    let mut conn = direct(port).await?;
                    redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await?;
                }
                Ok(())
            }
        }
    }
}

async fn direct(port: u16) -> Result<redis::aio::MultiplexedConnection, Error> {
    Ok(redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection()
        .await?)
}

/// The read path as the read function builds it, with the table's reads counted.
async fn read_path(
    env: &Env,
    topology: Topology<'_>,
    net: Net,
    table: &str,
    counts: Arc<Counts>,
) -> Result<Read, Error> {
    let cache_settings = CacheSettings::default();
    let settings = ReadSettings::new(topology.redis_settings(net), table, cache_settings.clone());
    let cache = RedisCache::from_settings(&settings.redis, &cache_settings, &env.sdk).await?;
    let store = Counting::new(DynamoStore::from_settings(&settings, &env.sdk), counts);
    Ok(ReadPath::new(cache, store, cache_settings))
}

/// The baseline's connections: the single node's (a connection manager, as the product's), or
/// one per cluster node through its proxy, each with the keys whose slots the node serves.
struct Raw {
    nodes: Vec<(ConnectionManager, Vec<usize>)>,
    /// One `MGET` (the single node) rather than a pipeline of `GET`s per node.
    mget: bool,
}

impl Raw {
    async fn connect(
        env: &Env,
        topology: Topology<'_>,
        net: Net,
        keys: &[String],
    ) -> Result<Raw, Error> {
        let cluster = match topology {
            Topology::Single(_) => {
                return Ok(Raw {
                    nodes: vec![(env.raw_conn(net).await?, (0..keys.len()).collect())],
                    mget: true,
                })
            }
            Topology::Cluster(cluster) => cluster,
        };
        let roles = cluster.roles().await?;
        let ports = cluster.ports();
        // The nodes announce their proxies' ports: a role names a node by either.
        let proxy_ports: Vec<u16> = cluster.proxies().iter().map(|p| p.port()).collect();
        let mut ask = direct(ports[0]).await?;
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); ports.len()];
        for (i, key) in keys.iter().enumerate() {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut ask)
                .await?;
            let owner = roles
                .iter()
                .find(|r| r.primary && r.serves(slot))
                .and_then(|r| {
                    ports
                        .iter()
                        .position(|&p| p == r.port)
                        .or_else(|| proxy_ports.iter().position(|&p| p == r.port))
                })
                .ok_or_else(|| format!("no node of the cluster serves slot {slot}"))?;
            groups[owner].push(i);
        }
        let mut nodes = Vec::new();
        for (proxy, group) in cluster.proxies().iter().zip(groups) {
            if !group.is_empty() {
                nodes.push((connection_manager(&proxy.redis_url()).await?, group));
            }
        }
        Ok(Raw { nodes, mget: false })
    }

    /// Every key's value, in the keys' order.
    async fn get(&self, keys: &[String]) -> Result<Vec<Option<String>>, redis::RedisError> {
        let mget = self.mget;
        let calls = self.nodes.iter().map(|(conn, group)| {
            let mut conn = conn.clone();
            async move {
                if mget {
                    let mut cmd = redis::cmd("MGET");
                    for &i in group {
                        cmd.arg(&keys[i]);
                    }
                    cmd.query_async::<Vec<Option<String>>>(&mut conn).await
                } else {
                    let mut pipe = redis::pipe();
                    for &i in group {
                        pipe.cmd("GET").arg(&keys[i]);
                    }
                    pipe.query_async::<Vec<Option<String>>>(&mut conn).await
                }
            }
        });
        let mut values = vec![None; keys.len()];
        for ((_, group), got) in self.nodes.iter().zip(join_all(calls).await) {
            for (&i, value) in group.iter().zip(got?) {
                values[i] = value;
            }
        }
        Ok(values)
    }

    /// `SET`s each key's value for an hour: a pipeline per node, the nodes in parallel.
    async fn set(&self, keys: &[String], values: &[String]) -> Result<(), redis::RedisError> {
        let calls = self.nodes.iter().map(|(conn, group)| {
            let mut conn = conn.clone();
            async move {
                let mut pipe = redis::pipe();
                for &i in group {
                    pipe.cmd("SET")
                        .arg(&keys[i])
                        .arg(&values[i])
                        .arg("EX")
                        .arg(3600)
                        .ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            }
        });
        join_all(calls).await.into_iter().collect()
    }
}

/// Runs `futures` together on this task and returns their outputs in order: the baseline's
/// nodes in parallel, as the product's are, without a task per node.
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (future, out) in pending.iter_mut().zip(done.iter_mut()) {
            if out.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *out = Some(value),
                    Poll::Pending => all = false,
                }
            }
        }
        if all {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    done.into_iter()
        .map(|out| out.expect("polled to completion"))
        .collect()
}

fn batch_ids(ids: &[String]) -> Result<BatchIds, Error> {
    // The benchmark's ids and the catalog's are plain (letters, digits, dashes): no encoding.
    Ok(BatchIds::parse(
        Some(&format!("ids={}", ids.join(","))),
        KeyType::S,
    )?)
}

fn keys_of(ids: &[String]) -> Vec<String> {
    ids.iter().map(|id| format!("product:{id}")).collect()
}

/// How many entries of `answer` are `status` with a document.
fn found(answer: &BatchAnswer, status: CacheStatus) -> usize {
    answer
        .entries
        .iter()
        .filter(|e| e.status == status && matches!(e.result, Ok(Lookup::Found(_))))
        .count()
}

/// Reads the batch until it is all hits: the cluster client forms its connections in the
/// background (answering from the table meanwhile), and a first read of uncached products
/// fills them.
async fn warm_up(read: &Read, batch: &BatchIds) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = read.get_many(batch).await;
        let hits = found(&answer, CacheStatus::Hit);
        if hits == batch.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(
                format!("the warm-up batch still had {hits} of {} hits", batch.len()).into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The products read one after another, as 50 single requests would: how many were hits.
async fn one_by_one(read: &Read, ids: &[String]) -> usize {
    let mut hits = 0;
    for id in ids {
        let (status, result, after) = read.answer(id).await;
        after.await;
        hits += usize::from(status == CacheStatus::Hit && matches!(result, Ok(Lookup::Found(_))));
    }
    hits
}

/// The busiest node's round trips, judged through the proxy: at most `limit` per node.
fn round_trip_row(
    figure: &'static str,
    what: String,
    topology: Topology<'_>,
    product: &Samples,
    baseline: &Samples,
    limit: f64,
    note: String,
) -> Row {
    let mut note = format!(
        "median of {}; max {}; {note}",
        product.len(),
        product.busiest(1.0)
    );
    if let Topology::Cluster(_) = topology {
        note.push_str(&format!(
            "; all nodes together {} (baseline {})",
            product.round_trips(0.5),
            baseline.round_trips(0.5)
        ));
    }
    Row {
        figure,
        what,
        net: Net::Proxy,
        judged_on: "round trips, busiest node",
        unit: Unit::RoundTrips,
        measured: product.busiest(0.5),
        baseline: Some(baseline.busiest(0.5)),
        baseline_label: topology.raw_label().into(),
        budget: Budget::AtMost(limit),
        note,
        failure: None,
    }
}

/// `batch-read`: 50 cached products, on the single node and on the cluster.
pub async fn hits(
    env: &Env,
    sizes: &Sizes,
    net: Net,
    cluster: &RedisCluster,
) -> Result<Vec<Row>, Error> {
    let mut rows = hits_on(env, sizes, net, Topology::Single(env)).await?;
    rows.extend(hits_on(env, sizes, net, Topology::Cluster(cluster)).await?);
    Ok(rows)
}

async fn hits_on(
    env: &Env,
    sizes: &Sizes,
    net: Net,
    topology: Topology<'_>,
) -> Result<Vec<Row>, Error> {
    topology.set_delay(env, net);
    let ids: Vec<String> = (0..PRODUCTS)
        .map(|i| format!("bench-batch-{i:02}"))
        .collect();
    let keys = keys_of(&ids);
    // Documents of about 400 bytes, as the hit figures cache.
    let docs: Vec<String> = ids
        .iter()
        .map(|id| {
            Document::from_item(&item_of(&image(id, "49.99", 1, 200))).map(Document::into_string)
        })
        .collect::<Result<_, _>>()?;
    topology.flushall().await?;
    let raw = Raw::connect(env, topology, net, &keys).await?;
    raw.set(&keys, &docs).await?;
    let counts = Arc::new(Counts::default());
    // The table is never read: every product is cached.
    let read = read_path(env, topology, net, "bench-unused", counts.clone()).await?;
    let batch = batch_ids(&ids)?;
    warm_up(&read, &batch).await?;
    for _ in 0..20 {
        raw.get(&keys).await?;
        one_by_one(&read, &ids[..5]).await;
    }

    let requests = match net {
        Net::Loopback => sizes.batch_read_requests,
        Net::Proxy => sizes.batch_read_requests_proxy,
    };
    let table_before = counts.now();
    let mut not_hits = 0;
    // The 50 single reads, once a round, between the blocks.
    let [product, baseline, sequential] = alternate(
        requests.div_ceil(BLOCK),
        [BLOCK, BLOCK, 1],
        Order::Fixed,
        async |side, _| {
            Ok(match side {
                PRODUCT => {
                    let ((answer, after), cost) = timed(&topology, read.answer_many(&batch)).await;
                    after.await;
                    not_hits += PRODUCTS - found(&answer, CacheStatus::Hit);
                    cost
                }
                RAW => {
                    let (values, cost) = timed(&topology, raw.get(&keys)).await;
                    not_hits += values?.iter().filter(|v| v.is_none()).count();
                    cost
                }
                _ => {
                    let (hits, cost) = timed(&topology, one_by_one(&read, &ids)).await;
                    not_hits += PRODUCTS - hits;
                    cost
                }
            })
        },
    )
    .await?
    .map(Samples::from);
    let table_reads = counts.now().items() - table_before.items();
    let failure = if not_hits > 0 {
        Some(format!("{not_hits} product reads were not hits"))
    } else if table_reads > 0 {
        Some(format!("the table was read {table_reads} times"))
    } else {
        None
    };

    let label = topology.label();
    let n = product.len();
    let mut rows = vec![Compare {
        figure: "batch-read",
        what: format!("{PRODUCTS} hits, {label}: latency p50"),
        baseline_label: topology.raw_label().into(),
        budget: Budget::RatioAtMost(1.3),
        unit: Unit::Micros,
        p: 0.5,
        through_proxy: ThroughProxy::Wall,
        note: format!(
            "ReadPath::answer_many; {n} requests each, alternating blocks of {BLOCK}; p99 {:.0} us vs {:.0} us",
            product.wall(0.99, Unit::Micros),
            baseline.wall(0.99, Unit::Micros)
        ),
        failure: failure.clone(),
    }
    .row(net, &product, &baseline)];
    if net == Net::Proxy {
        rows.push(Row {
            failure: failure.clone(),
            ..round_trip_row(
                "batch-read",
                format!("{PRODUCTS} hits, {label}: round trips per node"),
                topology,
                &product,
                &baseline,
                1.0,
                "counted by the proxies".into(),
            )
        });
    }
    rows.push(
        Compare {
            figure: "batch-read",
            what: format!("{PRODUCTS} hits, {label}: one batch vs {PRODUCTS} single reads"),
            baseline_label: "ReadPath::answer of each, one after another".into(),
            budget: Budget::FasterAtLeast(10.0),
            unit: Unit::Micros,
            p: 0.5,
            through_proxy: ThroughProxy::Wall,
            note: format!(
                "{} runs of {PRODUCTS} reads, between the blocks",
                sequential.len()
            ),
            failure,
        }
        .row(net, &product, &sequential),
    );
    Ok(rows)
}

/// `batch-read-miss`: the first [`PRODUCTS`] of `ids` (products of `table`), uncached before
/// every request, on the single node and on the cluster.
pub async fn misses(
    env: &Env,
    sizes: &Sizes,
    net: Net,
    cluster: &RedisCluster,
    table: &str,
    ids: &[String],
) -> Result<Vec<Row>, Error> {
    let ids = ids
        .get(..PRODUCTS)
        .ok_or("the miss table has fewer than 50 products")?;
    let mut rows = misses_on(env, sizes, net, Topology::Single(env), table, ids).await?;
    rows.extend(misses_on(env, sizes, net, Topology::Cluster(cluster), table, ids).await?);
    Ok(rows)
}

/// A plain cache-aside batch miss up to its answer: the `GET`s (all missing), one
/// `BatchGetItem` (strongly consistent, as the read path's default). The documents, for the
/// `SET`s after.
async fn plain_answer(
    env: &Env,
    raw: &Raw,
    table: &str,
    keys: &[String],
    ids: &[String],
) -> Result<Vec<String>, Error> {
    if raw.get(keys).await?.iter().any(Option::is_some) {
        return Err("the plain batch miss found a product cached".into());
    }
    let request: Vec<HashMap<String, AttributeValue>> = ids
        .iter()
        .map(|id| HashMap::from([("productId".to_owned(), AttributeValue::S(id.clone()))]))
        .collect();
    let out = env
        .dynamodb
        .batch_get_item()
        .request_items(
            table,
            KeysAndAttributes::builder()
                .set_keys(Some(request))
                .consistent_read(true)
                .build()?,
        )
        .send()
        .await?;
    if out.unprocessed_keys.as_ref().is_some_and(|u| !u.is_empty()) {
        return Err("the plain batch miss's BatchGetItem left keys unprocessed".into());
    }
    let mut docs: HashMap<String, String> = HashMap::new();
    for item in out
        .responses
        .and_then(|mut r| r.remove(table))
        .unwrap_or_default()
    {
        let id = match item.get("productId") {
            Some(AttributeValue::S(id)) => id.clone(),
            _ => return Err("an item without its productId".into()),
        };
        let doc = Document::from_item(&serde_dynamo::Item::from(item).into_inner())?;
        docs.insert(id, doc.into_string());
    }
    ids.iter()
        .map(|id| {
            docs.remove(id)
                .ok_or_else(|| -> Error { format!("product {id} is not in the table").into() })
        })
        .collect()
}

async fn misses_on(
    env: &Env,
    sizes: &Sizes,
    net: Net,
    topology: Topology<'_>,
    table: &str,
    ids: &[String],
) -> Result<Vec<Row>, Error> {
    topology.set_delay(env, net);
    let keys = keys_of(ids);
    let counts = Arc::new(Counts::default());
    let read = read_path(env, topology, net, table, counts.clone()).await?;
    let raw = Raw::connect(env, topology, net, &keys).await?;
    let batch = batch_ids(ids)?;
    // Connections, the scripts loaded on every node, the table's first reads.
    topology.flushall().await?;
    warm_up(&read, &batch).await?;
    topology.flushall().await?;
    plain_answer(env, &raw, table, &keys, ids).await?;

    let mut product_all = Samples::default();
    let mut per_request: Vec<TableReads> = Vec::new();
    let mut not_misses = 0;
    let [product, baseline] = alternate(
        sizes.batch_read_misses,
        [1, 1],
        Order::Fixed,
        async |side, _| {
            topology.flushall().await?;
            if side != PRODUCT {
                let (docs, cost) =
                    timed(&topology, plain_answer(env, &raw, table, &keys, ids)).await;
                raw.set(&keys, &docs?).await?;
                return Ok(cost);
            }
            let table_before = counts.now();
            let before = topology.counts();
            let ((answer, after), cost) = timed(&topology, read.answer_many(&batch)).await;
            // After the answer, untimed; the next request starts once the fills are done.
            after.await;
            let (round_trips, busiest) = trips_since(&topology, &before);
            product_all.push(Cost {
                wall: cost.wall,
                round_trips,
                busiest,
            });
            let now = counts.now();
            per_request.push(TableReads {
                gets: now.gets - table_before.gets,
                batches: now.batches - table_before.batches,
                batch_ids: now.batch_ids - table_before.batch_ids,
                slowest_us: 0,
            });
            not_misses += PRODUCTS - found(&answer, CacheStatus::Miss);
            Ok(cost)
        },
    )
    .await?
    .map(Samples::from);

    let most = per_request.iter().map(|r| r.batches).max().unwrap_or(0);
    let least = per_request.iter().map(|r| r.batches).min().unwrap_or(0);
    let gets: u64 = per_request.iter().map(|r| r.gets).sum();
    let ids_read = per_request.iter().map(|r| r.batch_ids).max().unwrap_or(0);
    let failure = if not_misses > 0 {
        Some(format!("{not_misses} product reads were not misses"))
    } else if least != 1 || gets > 0 {
        Some(format!(
            "a request made {least} BatchGetItems (or {gets} GetItems in all): one per request expected"
        ))
    } else {
        None
    };
    let label = topology.label();
    let mut rows = vec![Row {
        figure: "batch-read-miss",
        what: format!("{PRODUCTS} misses, {label}: BatchGetItems per request"),
        net,
        judged_on: "counted around the store",
        unit: Unit::Count,
        measured: most as f64,
        baseline: Some(1.0),
        baseline_label: "one BatchGetItem (plain cache-aside)".into(),
        budget: Budget::AtMost(1.0),
        note: format!(
            "ReadPath::answer_many, {} requests: {least} to {most} BatchGetItems of up to {ids_read} ids each, {gets} GetItems; answer wall p50 {:.2} ms vs {:.2} ms plain cache-aside (not judged; DynamoDB is moto)",
            product.len(),
            product.wall(0.5, Unit::Millis),
            baseline.wall(0.5, Unit::Millis),
        ),
        failure: failure.clone(),
    }];
    if net == Net::Proxy {
        rows.push(Row {
            failure,
            ..round_trip_row(
                "batch-read-miss",
                format!("{PRODUCTS} misses, {label}: Redis round trips per node before the answer"),
                topology,
                &product,
                &baseline,
                2.0,
                format!(
                    "{} per node with the fills after the answer (median)",
                    product_all.busiest(0.5)
                ),
            )
        });
    }
    Ok(rows)
}
