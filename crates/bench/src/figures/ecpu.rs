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
    /// Each operation's ECPUs, as billed alone.
    each: Vec<f64>,
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

    /// ECPUs per operation: the median operation's, since a command's time counts a moment
    /// the server process was not scheduled (a 2-core machine running the benchmark too), and
    /// one such moment in a hundred operations would move a mean by half.
    fn ecpus_per_op(&self) -> f64 {
        if self.each.is_empty() {
            f64::NAN
        } else {
            stats::median(&self.each)
        }
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

    /// Bills `ops` operations of `work`, each after its `setup` (not billed): a `MONITOR`
    /// sample of a few first tells top-level commands from the ones scripts ran; then each
    /// operation runs with the counters zeroed before it and read after it.
    async fn bill<S, SF, W, WF>(&self, ops: usize, mut setup: S, mut work: W) -> Result<Bill, Error>
    where
        S: FnMut(usize) -> SF,
        SF: std::future::Future<Output = Result<(), Error>>,
        W: FnMut(usize) -> WF,
        WF: std::future::Future<Output = Result<(), Error>>,
    {
        let sample = ops.min(5);
        let mut mix = Mix::default();
        for i in 0..sample {
            setup(i).await?;
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
        let mut counted: BTreeMap<String, CmdStat> = BTreeMap::new();
        let mut bytes = 0.0;
        let mut each = Vec::with_capacity(ops);
        for i in sample..sample + ops {
            setup(i).await?;
            redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async::<()>(&mut self.control.clone())
                .await?;
            work(i).await?;
            let info: String = redis::cmd("INFO")
                .arg("stats")
                .arg("commandstats")
                .query_async(&mut self.control.clone())
                .await?;
            let this = stats::parse_commandstats(&info);
            for (name, s) in &this {
                let entry = counted.entry(name.clone()).or_default();
                entry.calls += s.calls;
                entry.usec += s.usec;
            }
            let this_bytes = stats::info_field(&info, "total_net_input_bytes")
                + stats::info_field(&info, "total_net_output_bytes")
                - OWN_BYTES;
            bytes += this_bytes;
            each.push(bill_of(this, this_bytes, &mix, 1).ecpus());
        }
        let mut bill = bill_of(counted, bytes, &mix, ops);
        bill.each = each;
        Ok(bill)
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
        each: Vec::new(),
    }
}

/// A document of about `bytes` for product `id`, as the read path caches it.
fn doc(id: &str, price: &str, version: u64, padding: usize) -> Result<String, Error> {
    Ok(Document::from_item(&item_of(&image(id, price, version, padding)))?.into_string())
}

/// Nothing to prepare before an operation.
async fn nothing(_: usize) -> Result<(), Error> {
    Ok(())
}

/// The figure's rows: loopback only, since ECPUs are counted at the server.
async fn run(env: &Env, sizes: &Sizes, target: &Target) -> Result<Vec<Row>, Error> {
    let meter = Meter::connect(target.backend_port).await?;
    let n = sizes.ecpu_ops;
    // Products for the misses: each is read once, by the product or the plain client, plus
    // the MONITOR samples'.
    let (table, ids) = super::miss::prepare_table(env, 2 * n + 20).await?;
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

    // The plain GET: the vCPU unit, and the hit's baseline.
    let hot = "bench-ecpu-hot";
    let hot_key = format!("product:{hot}");
    set_all(&meter, &[(hot_key.clone(), doc(hot, "129.99", 1, 200)?)]).await?;
    let plain_get = meter
        .bill(n, nothing, |_| {
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
        .filter(|u| *u > 0.0)
        .ok_or("the plain GETs are not in INFO commandstats")?;

    let hit = meter
        .bill(n, nothing, |_| async {
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
        .bill(n, nothing, |i| {
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
        .bill(n, nothing, |i| {
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
    let batch_reads = (n / 10).max(10);
    let batch_read = meter
        .bill(batch_reads, nothing, |_| async {
            let hits = read.get_many(&batch).await.count(CacheStatus::Hit);
            if hits != BATCH {
                return Err(format!("{hits} of {BATCH} cached products were hits").into());
            }
            Ok(())
        })
        .await?;
    let plain_batch = meter
        .bill(batch_reads, nothing, |_| {
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

    // Invalidated records: stream batches of RECORDS changes to as many cached products.
    let batches = (n / RECORDS).max(5);
    let record_ids: Vec<String> = (0..RECORDS)
        .map(|i| format!("bench-ecpu-r{i:03}"))
        .collect();
    let cached_at = |version: u64| {
        record_ids
            .iter()
            .map(|id| Ok((format!("product:{id}"), doc(id, "1.99", version, 200)?)))
            .collect::<Result<Vec<_>, Error>>()
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
        // Each batch changes every product to a newer version than the last batch did.
        let event = |i: usize| {
            let version = i as u64 + 2;
            let records = record_ids
                .iter()
                .map(|id| {
                    let new = image(id, &format!("{version}.99"), version, 200);
                    let old = image(id, "1.99", version - 1, 200);
                    records::record("MODIFY", id, Some(new), Some(old), "NEW_AND_OLD_IMAGES")
                })
                .collect();
            records::event(records)
        };
        let cached = cached_at(1)?;
        let product = meter
            .bill(
                batches,
                |_| set_all(&meter, &cached),
                |i| {
                    let (inv, event) = (&inv, event(i));
                    async move {
                        let failed = inv.handle(event).await.batch_item_failures.len();
                        if failed > 0 {
                            return Err(format!("the batch reported {failed} failures").into());
                        }
                        Ok(())
                    }
                },
            )
            .await?;
        let changed = cached_at(2)?;
        let plain = meter
            .bill(
                batches,
                |_| set_all(&meter, &cached),
                |_| {
                    let mut raw = meter.raw.clone();
                    let changed = &changed;
                    async move {
                        let mut pipe = redis::pipe();
                        for (key, doc) in changed {
                            match mode {
                                InvalidationMode::Delete => pipe.cmd("DEL").arg(key),
                                InvalidationMode::Refresh => {
                                    pipe.cmd("SET").arg(key).arg(doc).arg("EX").arg(3600)
                                }
                            }
                            .ignore();
                        }
                        pipe.query_async::<()>(&mut raw).await?;
                        Ok(())
                    }
                },
            )
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
            "on {}; per operation: {} vs {}; 1 ECPU of vCPU = {USEC_PER_ECPU} us of commandstats time (a plain GET took {get_usec:.2} us)",
            target.label,
            bills.0.describe(),
            bills.1.describe()
        ),
        failure: None,
    }
    };
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
            2.0,
        ),
        row(
            format!("ECPUs per batch read of {BATCH}"),
            1.0,
            (&batch_read, &plain_batch),
            "50 GETs",
            1.1,
        ),
    ];
    for (mode, product, plain) in &invalidations {
        let (label, budget) = match mode {
            InvalidationMode::Delete => ("a DEL per record", 2.0),
            InvalidationMode::Refresh => ("a SET per record", 2.0),
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
