//! What the system costs on ElastiCache Serverless, which bills requests in ECPUs: per hit, per
//! miss, per batch read of 50, and per invalidated record in each invalidation mode, each
//! against what a plain cache-aside client pays for the same work (a `GET`; a `GET` and a `SET`;
//! 50 `GET`s; a `DEL` or a `SET` per record).
//!
//! AWS's rule (ElastiCache pricing, "ElastiCache Processing Units"): a simple read or write
//! costs 1 ECPU per kilobyte transferred, at least 1; any other command (a script, `MGET`)
//! costs the higher of its vCPU time, in multiples of a simple command's, and the kilobytes
//! it transferred. `INFO`, `CLUSTER`, `AUTH`, `HELLO`, `CLIENT` and the like are not metered.
//! AWS does not publish the exact vCPU formula; this figure applies the one AWS's own estimator
//! uses (aws/agent-toolkit-for-aws, `serverless_estimator.py`, from AWS's pricing blog's
//! example): a command's vCPU multiple is its `INFO commandstats` time over 3 us. A plain
//! `GET`'s own time is measured beside it (it is ~1-2 us here: `commandstats` leaves out the
//! reading, parsing and writing around a command, which AWS's vCPU time includes, so dividing
//! by it would overstate every script several times).
//!
//! The product runs against the serverless stand-in (TLS, one virtual shard, its batches
//! grouped by hash slot as a serverless cache requires), and the meter is the `redis-server`
//! behind it: its `INFO commandstats` (which commands, their time; a `MONITOR` sample tells the
//! ones clients sent from the ones scripts ran) and `INFO stats` (bytes in and out). What
//! crosses it is what the client sent and received, less TLS framing and the commands the
//! front answers itself (`CLUSTER`, `AUTH`), which AWS does not meter either. The bytes of one
//! kind of operation are split evenly over its top-level commands; the operations measured
//! here each send one kind of command, or commands well under a kilobyte, where that is exact.

use std::collections::BTreeMap;

use futures::{StreamExt, TryStreamExt};

use local_stack::services::{ServerlessCache, ServerlessOptions};
use product_cache::config::{
    CacheSettings, CacheType, InvalidationMode, InvalidatorSettings, ReadSettings, RedisSettings,
};
use product_cache::document::Document;
use product_cache::id::{KeyType, ProductId};
use product_cache::invalidate::Invalidator;
use product_cache::read::{BatchIds, CacheStatus, ReadPath};
use redis::aio::{ConnectionManager, MultiplexedConnection};

use crate::env::{connection_manager, Env};
use crate::records::{self, image, item_of};
use crate::report::{Budget, Net, Row, Unit};
use crate::stats::{self, CmdStat, Mix};
use crate::{Error, Sizes};

/// Commands AWS does not meter (its estimator's list), the benchmark's own, and replication's.
const UNMETERED: [&str; 15] = [
    "info",
    "config",
    "cluster",
    "auth",
    "hello",
    "client",
    "readonly",
    "readwrite",
    "echo",
    "ping",
    "select",
    "command",
    // A replica's own traffic.
    "replconf",
    "psync",
    "sync",
];

/// Simple reads and writes: 1 ECPU per KB, at least 1, whatever their time.
const SIMPLE: [&str; 10] = [
    "get", "set", "del", "unlink", "exists", "expire", "pexpire", "ttl", "pttl", "setex",
];

/// `INFO commandstats` microseconds per ECPU of vCPU time: AWS's estimator's rule.
const USEC_PER_ECPU: f64 = 3.0;

/// Operations under `MONITOR` before a bill, and operations in flight during it.
const SAMPLE: usize = 5;
const CONCURRENCY: usize = 8;

/// Products per batch read, as the batch-read figure.
const BATCH: usize = 50;
/// Records per stream batch: a Lambda event of the template's `BatchSize`.
const RECORDS: usize = 100;

/// Where the product runs and what meters it.
struct Target {
    /// The functions' Redis settings.
    redis: RedisSettings,
    /// The `redis-server` that serves the product's data commands.
    backend_port: u16,
    /// What the product runs on, for the notes.
    label: String,
}

/// The figure on a local serverless cache ([`ServerlessCache`]), as the functions run on one:
/// TLS, `REDIS_CACHE_TYPE=serverless`.
pub async fn on_serverless(env: &Env, sizes: &Sizes) -> Result<Vec<Row>, Error> {
    let cache = ServerlessCache::start(ServerlessOptions::default()).await?;
    let mut redis = RedisSettings::new(cache.url());
    redis.cache_type = CacheType::Serverless;
    redis.cluster = true;
    redis.ca_file = Some(cache.ca_file().to_path_buf());
    let target = Target {
        redis,
        backend_port: cache.backend().port(),
        label: "the local serverless stand-in".into(),
    };
    run(env, sizes, &target).await
}

/// The backend's accounting.
struct Meter {
    port: u16,
    control: MultiplexedConnection,
    raw: ConnectionManager,
}

/// What one kind of operation cost, over `ops` of it.
#[derive(Debug, Clone, Default)]
struct Bill {
    ops: usize,
    /// Top-level commands by name: calls and usec (a script's nested commands are inside it).
    top: BTreeMap<String, CmdStat>,
    bytes: f64,
}

impl Bill {
    fn calls(&self) -> f64 {
        self.top.values().map(|s| s.calls as f64).sum()
    }

    /// The ECPUs of these commands, all of them.
    fn ecpus(&self) -> f64 {
        let calls = self.calls();
        if calls == 0.0 {
            return f64::NAN;
        }
        let kb_per_call = self.bytes / 1024.0 / calls;
        self.top
            .iter()
            .map(|(name, s)| {
                let n = s.calls as f64;
                let units = if SIMPLE.contains(&name.as_str()) {
                    1.0
                } else {
                    (s.usec as f64 / n) / USEC_PER_ECPU
                };
                n * units.max(kb_per_call).max(1.0)
            })
            .sum()
    }

    /// ECPUs per operation.
    fn ecpus_per_op(&self) -> f64 {
        self.ecpus() / self.ops.max(1) as f64
    }

    /// e.g. `evalsha 2, get 1; 0.6 KB`, per operation.
    fn describe(&self) -> String {
        let ops = self.ops.max(1) as f64;
        let commands: Vec<String> = self
            .top
            .iter()
            .map(|(name, s)| {
                format!(
                    "{name} {} ({:.1} us)",
                    trim(s.calls as f64 / ops),
                    s.usec as f64 / s.calls.max(1) as f64
                )
            })
            .collect();
        format!(
            "{}; {:.2} KB",
            commands.join(", "),
            self.bytes / 1024.0 / ops
        )
    }
}

fn trim(v: f64) -> String {
    let text = format!("{v:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The bytes `INFO stats commandstats` and `CONFIG RESETSTAT` add to the counts they read:
/// the request of the one, the `+OK` of the other.
const OWN_BYTES: f64 =
    (b"*3\r\n$4\r\nINFO\r\n$5\r\nstats\r\n$12\r\ncommandstats\r\n".len() + b"+OK\r\n".len()) as f64;

impl Meter {
    async fn connect(port: u16) -> Result<Meter, Error> {
        let url = format!("redis://127.0.0.1:{port}");
        let control = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Meter {
            port,
            control,
            raw: connection_manager(&url).await?,
        })
    }

    /// Bills `ops` operations of `work` (operation `i` is `work(i)`; whatever it needs is
    /// prepared before): a `MONITOR` sample of the first few tells top-level commands from the
    /// ones scripts ran; then the counters are zeroed, the rest run `CONCURRENCY` at a time,
    /// and the counters are read.
    ///
    /// Concurrently, because a command's time depends on how warm the server is: one script
    /// call at a time, the server idle between them, took 60-110 us where the same calls
    /// back to back took 16-28 us (the Lua interpreter's code and data cold in the CPU's
    /// caches). A serverless cache's nodes serve many clients at once.
    async fn bill<W, WF>(&self, ops: usize, work: W) -> Result<Bill, Error>
    where
        W: Fn(usize) -> WF,
        WF: std::future::Future<Output = Result<(), Error>>,
    {
        let mut mix = Mix::default();
        for i in 0..SAMPLE {
            let (done, seen) =
                stats::sample_mix(self.port, &mut self.control.clone(), work(i)).await?;
            done?;
            for (name, calls) in seen.top {
                *mix.top.entry(name).or_default() += calls;
            }
            for (name, calls) in seen.nested {
                *mix.nested.entry(name).or_default() += calls;
            }
        }
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut self.control.clone())
            .await?;
        futures::stream::iter(SAMPLE..SAMPLE + ops)
            .map(&work)
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .arg("commandstats")
            .query_async(&mut self.control.clone())
            .await?;
        let bytes = stats::info_field(&info, "total_net_input_bytes")
            + stats::info_field(&info, "total_net_output_bytes")
            - OWN_BYTES;
        Ok(bill_of(stats::parse_commandstats(&info), bytes, &mix, ops))
    }
}

/// The top-level, metered commands of `counted` (summed `INFO commandstats`).
fn bill_of(counted: BTreeMap<String, CmdStat>, bytes: f64, mix: &Mix, ops: usize) -> Bill {
    let mut top = BTreeMap::new();
    for (name, s) in counted {
        let base = name.split('|').next().unwrap_or(&name).to_owned();
        if UNMETERED.contains(&base.as_str()) {
            continue;
        }
        let share = mix.top_share(&name);
        let calls = (s.calls as f64 * share).round() as u64;
        if calls == 0 {
            continue;
        }
        // A nested command's time is inside its script's: keep the top-level share only.
        let usec = (s.usec as f64 * share).round() as u64;
        let entry: &mut CmdStat = top.entry(base).or_default();
        entry.calls += calls;
        entry.usec += usec;
    }
    Bill {
        ops,
        top,
        bytes: bytes.max(0.0),
    }
}

/// A document of about `bytes` for product `id`, as the read path caches it.
fn doc(id: &str, price: &str, version: u64, padding: usize) -> Result<String, Error> {
    Ok(Document::from_item(&item_of(&image(id, price, version, padding)))?.into_string())
}

/// The figure's rows: loopback only, since ECPUs are counted at the server.
async fn run(env: &Env, sizes: &Sizes, target: &Target) -> Result<Vec<Row>, Error> {
    let meter = Meter::connect(target.backend_port).await?;
    let n = sizes.ecpu_ops;
    // Products for the misses: each is read once, by the product or the plain client.
    let (table, ids) = super::miss::prepare_table(env, 2 * (n + SAMPLE)).await?;
    let read = ReadPath::build(
        ReadSettings::new(
            target.redis.clone(),
            table.as_str(),
            CacheSettings::default(),
        ),
        &env.sdk,
    )
    .await?;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut meter.control.clone())
        .await?;

    // The plain GET: the hit's baseline.
    let hot = "bench-ecpu-hot";
    let hot_key = format!("product:{hot}");
    set_all(&meter, &[(hot_key.clone(), doc(hot, "129.99", 1, 200)?)]).await?;
    let plain_get = meter
        .bill(n, |_| {
            let mut raw = meter.raw.clone();
            let key = hot_key.clone();
            async move {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<String>>(&mut raw)
                    .await?
                    .ok_or("the plain GET's key is gone")?;
                Ok(())
            }
        })
        .await?;
    let get_usec = plain_get
        .top
        .get("get")
        .map(|s| s.usec as f64 / s.calls.max(1) as f64)
        .unwrap_or(f64::NAN);

    let hit = meter
        .bill(n, |_| async {
            match read.get(hot).await {
                (CacheStatus::Hit, Ok(_)) => Ok(()),
                (status, _) => Err(format!("a read of a cached product was {status:?}").into()),
            }
        })
        .await?;

    // Misses: products never read (the lease's probe, the table read, the fill), against a
    // plain cache-aside miss (the GET that finds nothing, the SET after the table read).
    let (miss_ids, plain_ids) = ids.split_at(ids.len() / 2);
    let miss = meter
        .bill(n, |i| {
            let id = miss_ids[i].clone();
            let read = &read;
            async move {
                match read.get(&id).await {
                    (CacheStatus::Miss, Ok(_)) => Ok(()),
                    (status, _) => Err(format!("a first read was {status:?}").into()),
                }
            }
        })
        .await?;
    let plain_miss = meter
        .bill(n, |i| {
            let id = plain_ids[i].clone();
            let mut raw = meter.raw.clone();
            async move {
                let key = format!("product:{id}");
                let cached: Option<String> =
                    redis::cmd("GET").arg(&key).query_async(&mut raw).await?;
                if cached.is_some() {
                    return Err("the plain miss's product was cached".into());
                }
                redis::cmd("SET")
                    .arg(&key)
                    .arg(doc(&id, "9.99", 1, 200)?)
                    .arg("EX")
                    .arg(3600)
                    .query_async::<()>(&mut raw)
                    .await?;
                Ok(())
            }
        })
        .await?;

    // Batch reads of 50 cached products, against 50 plain GETs.
    let batch_ids: Vec<String> = (0..BATCH).map(|i| format!("bench-ecpu-b{i:02}")).collect();
    let batch_docs = batch_ids
        .iter()
        .map(|id| Ok((format!("product:{id}"), doc(id, "49.99", 1, 200)?)))
        .collect::<Result<Vec<_>, Error>>()?;
    set_all(&meter, &batch_docs).await?;
    let batch = BatchIds::new(
        batch_ids
            .iter()
            .map(|id| ProductId::parse(id, KeyType::S))
            .collect::<Result<Vec<_>, _>>()?,
    )?;
    let batch_reads = (n / 10).max(20);
    let batch_read = meter
        .bill(batch_reads, |_| async {
            let hits = read.get_many(&batch).await.count(CacheStatus::Hit);
            if hits != BATCH {
                return Err(format!("{hits} of {BATCH} cached products were hits").into());
            }
            Ok(())
        })
        .await?;
    let plain_batch = meter
        .bill(batch_reads, |_| {
            let mut raw = meter.raw.clone();
            let docs = &batch_docs;
            async move {
                let mut pipe = redis::pipe();
                for (key, _) in docs {
                    pipe.cmd("GET").arg(key);
                }
                let found: Vec<Option<String>> = pipe.query_async(&mut raw).await?;
                if found.iter().any(Option::is_none) {
                    return Err("a plain batch's key is gone".into());
                }
                Ok(())
            }
        })
        .await?;

    // Invalidated records: stream batches of RECORDS changes, each batch to its own cached
    // products (batches run side by side), all cached before the bill.
    let batches = (n / 10).max(20);
    let products_of = |side: &str, b: usize| -> Vec<String> {
        (0..RECORDS)
            .map(|i| format!("bench-ecpu-{side}{b:03}-{i:03}"))
            .collect()
    };
    let mut invalidations = Vec::new();
    for mode in [InvalidationMode::Delete, InvalidationMode::Refresh] {
        let inv = Invalidator::build(
            InvalidatorSettings {
                redis: target.redis.clone(),
                mode,
                cache: CacheSettings::default(),
            },
            &env.sdk,
        )
        .await?;
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut meter.control.clone())
            .await?;
        inv.cache().declare_empty().await?;
        for side in ["p", "q"] {
            for b in 0..SAMPLE + batches {
                let cached = products_of(side, b)
                    .iter()
                    .map(|id| Ok((format!("product:{id}"), doc(id, "1.99", 1, 200)?)))
                    .collect::<Result<Vec<_>, Error>>()?;
                set_all(&meter, &cached).await?;
            }
        }
        let products_of = &products_of;
        let product = meter
            .bill(batches, |b| {
                let records = products_of("p", b)
                    .iter()
                    .map(|id| {
                        let new = image(id, "2.99", 2, 200);
                        let old = image(id, "1.99", 1, 200);
                        records::record("MODIFY", id, Some(new), Some(old), "NEW_AND_OLD_IMAGES")
                    })
                    .collect();
                let inv = &inv;
                async move {
                    let response = inv.handle(records::event(records)).await;
                    let failed = response.batch_item_failures.len();
                    if failed > 0 {
                        return Err(format!("the batch reported {failed} failures").into());
                    }
                    Ok(())
                }
            })
            .await?;
        let plain = meter
            .bill(batches, |b| {
                let mut raw = meter.raw.clone();
                let ids = products_of("q", b);
                async move {
                    let mut pipe = redis::pipe();
                    for id in &ids {
                        let key = format!("product:{id}");
                        match mode {
                            InvalidationMode::Delete => pipe.cmd("DEL").arg(key),
                            InvalidationMode::Refresh => pipe
                                .cmd("SET")
                                .arg(key)
                                .arg(doc(id, "2.99", 2, 200)?)
                                .arg("EX")
                                .arg(3600),
                        }
                        .ignore();
                    }
                    pipe.query_async::<()>(&mut raw).await?;
                    Ok(())
                }
            })
            .await?;
        invalidations.push((mode, product, plain));
    }

    let row = |what: String, per: f64, bills: (&Bill, &Bill), label: &str, budget: f64| {
        Row {
        figure: "ecpu",
        what,
        net: Net::Loopback,
        judged_on: "INFO commandstats and bytes, AWS's ECPU rule",
        unit: Unit::Mean,
        measured: bills.0.ecpus_per_op() / per,
        baseline: Some(bills.1.ecpus_per_op() / per),
        baseline_label: label.into(),
        budget: Budget::RatioAtMost(budget),
        note: format!(
            "on {}, {CONCURRENCY} operations in flight; per operation: {} vs {}; 1 ECPU of vCPU = {USEC_PER_ECPU} us of commandstats time (a plain GET took {get_usec:.2} us)",
            target.label,
            bills.0.describe(),
            bills.1.describe()
        ),
        failure: None,
    }
    };
    // Budgets: a hit and a batch read cost what a plain client pays. A miss and an
    // invalidation pay for their scripts' time, an estimate that moves with how warm the server
    // is (a miss 16-25x a plain one, a record 4-6x a DEL or 6-12x a SET, between runs here):
    // the budgets catch a script that doubles its work, not the noise.
    let mut rows = vec![
        row(
            "ECPUs per hit".into(),
            1.0,
            (&hit, &plain_get),
            "a GET",
            1.0,
        ),
        row(
            "ECPUs per miss".into(),
            1.0,
            (&miss, &plain_miss),
            "a plain miss: GET, then SET",
            40.0,
        ),
        row(
            format!("ECPUs per batch read of {BATCH}"),
            1.0,
            (&batch_read, &plain_batch),
            "50 GETs",
            1.0,
        ),
    ];
    for (mode, product, plain) in &invalidations {
        let (label, budget) = match mode {
            InvalidationMode::Delete => ("a DEL per record", 10.0),
            InvalidationMode::Refresh => ("a SET per record", 20.0),
        };
        rows.push(row(
            format!("ECPUs per invalidated record, {} mode", label_of(*mode)),
            RECORDS as f64,
            (product, plain),
            label,
            budget,
        ));
    }
    Ok(rows)
}

/// Caches `docs` (key, document) with the read path's TTL, straight on the backend.
async fn set_all(meter: &Meter, docs: &[(String, String)]) -> Result<(), Error> {
    let mut pipe = redis::pipe();
    for (key, doc) in docs {
        pipe.cmd("SET")
            .arg(key)
            .arg(doc)
            .arg("EX")
            .arg(3600)
            .ignore();
    }
    pipe.query_async::<()>(&mut meter.raw.clone()).await?;
    Ok(())
}

fn label_of(mode: InvalidationMode) -> &'static str {
    match mode {
        InvalidationMode::Delete => "delete",
        InvalidationMode::Refresh => "refresh",
    }
}
