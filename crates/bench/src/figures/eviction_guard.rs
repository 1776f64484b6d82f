//! The eviction guard (issue 20): refresh mode's Redis cost per record with the apply script
//! asking the node's eviction count (`INFO stats`, once per script call that writes) against the
//! same batches with the guard off (`Guards::evictions: false`, the design before it), in
//! alternating rounds. On the single node a script call covers up to 1,000 keys, so one `INFO`
//! is spread over them; on the 3-node cluster every key of the batch is in a hash slot of its
//! own, so each record is a script call of its own and pays an `INFO`: the worst case, and about
//! what a batch of 1,000 distinct products is (they fall in some 970 slots).
//!
//! The two sides use keys in different hash slots (even slots with the guard, odd ones
//! without), because each leaves its slots' epoch keys in its own form (`<ms>:<count>` or
//! `<ms>:-`), which the other would take as a reason for a new epoch. Both keep their keys
//! between rounds: a round is a steady-state batch (documents cached, positions and epochs
//! set), not a first write.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use local_stack::services::RedisCluster;
use product_cache::cache::slots::slot_of;
use product_cache::cache::{Guards, RedisCache};
use product_cache::config::{CacheSettings, InvalidationMode, InvalidatorSettings, RedisSettings};
use product_cache::document::Document;
use product_cache::invalidate::Invalidator;
use redis::aio::MultiplexedConnection;
use serde_json::Value;

use crate::compare::{alternate, Order, PRODUCT};
use crate::env::Env;
use crate::records::{self, image, item_of};
use crate::report::{Budget, Net, Row, Unit};
use crate::stats::{self, CmdStat};
use crate::{Error, Sizes};

const FIGURE: &str = "eviction-guard";

/// Batches per sample, each side, each round: about 40 ms of the single node's CPU (one batch's
/// 20 ms scattered more).
const BATCHES_PER_SAMPLE: usize = 2;

/// A single node's budget: its INFO is shared by up to 1,000 keys (see `run`).
const SINGLE_BUDGET: f64 = 1.25;
/// The cluster's, a script call (so an INFO) per record: 1.5x to 1.8x measured between runs on
/// a shared 2-core machine, an INFO costing the script 30 to 40 us of elapsed time (some 10 us
/// of it INFO's own) and the nodes 18 to 30 us of CPU per record, against 35 to 38 us without
/// it. Two INFOs per call would be past 2x.
const CLUSTER_BUDGET: f64 = 2.0;

/// Direct connections to every node (never through a proxy), for Redis's own accounting.
pub struct Nodes(Vec<MultiplexedConnection>);

impl Nodes {
    pub async fn connect(ports: &[u16]) -> Result<Self, Error> {
        let mut conns = Vec::with_capacity(ports.len());
        for port in ports {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
            conns.push(client.get_multiplexed_async_connection().await?);
        }
        Ok(Nodes(conns))
    }

    async fn each(&self, cmd: &redis::Cmd) -> Result<Vec<redis::Value>, Error> {
        let mut out = Vec::with_capacity(self.0.len());
        for conn in &self.0 {
            out.push(cmd.query_async(&mut conn.clone()).await?);
        }
        Ok(out)
    }

    async fn infos(&self, section: &str) -> Result<Vec<String>, Error> {
        let mut out = Vec::with_capacity(self.0.len());
        for conn in &self.0 {
            out.push(
                redis::cmd("INFO")
                    .arg(section)
                    .query_async(&mut conn.clone())
                    .await?,
            );
        }
        Ok(out)
    }

    pub async fn flushall(&self) -> Result<(), Error> {
        self.each(&redis::cmd("FLUSHALL")).await?;
        Ok(())
    }

    async fn resetstat(&self) -> Result<(), Error> {
        self.each(redis::cmd("CONFIG").arg("RESETSTAT")).await?;
        Ok(())
    }

    /// Every node's server CPU time so far, summed, in seconds.
    async fn cpu_seconds(&self) -> Result<f64, Error> {
        Ok(self
            .infos("cpu")
            .await?
            .iter()
            .map(|i| stats::parse_cpu(i))
            .sum())
    }

    /// Every node's `INFO commandstats`, summed per command. An `INFO` is not in its own
    /// answer, so right after `CONFIG RESETSTAT` the `info` line counts the scripts' alone.
    async fn commandstats(&self) -> Result<BTreeMap<String, CmdStat>, Error> {
        let mut sum: BTreeMap<String, CmdStat> = BTreeMap::new();
        for info in self.infos("commandstats").await? {
            for (name, s) in stats::parse_commandstats(&info) {
                let total = sum.entry(name).or_default();
                total.calls += s.calls;
                total.usec += s.usec;
            }
        }
        Ok(sum)
    }
}

/// `n` products whose keys are each in a hash slot of their own, all even (`parity` 0) or all
/// odd (1), so that the two sides of the figure share no slot and no epoch key.
fn ids_in_own_slots(n: usize, parity: u16, prefix: &str) -> Vec<String> {
    let mut taken = std::collections::HashSet::new();
    let mut ids = Vec::with_capacity(n);
    let mut i = 0u64;
    while ids.len() < n {
        let id = format!("bench-g{parity}-{i:06}");
        let slot = slot_of(&format!("{prefix}{id}"));
        if slot % 2 == parity && taken.insert(slot) {
            ids.push(id);
        }
        i += 1;
    }
    ids
}

/// One side of the figure: an invalidator with the eviction guard on or off, its products, and
/// what each of its measured batches cost.
struct Side {
    guard: bool,
    inv: Invalidator<RedisCache>,
    ids: Vec<String>,
    batches: usize,
    records: usize,
    script_calls: u64,
    info_calls: u64,
    renames: u64,
    /// Per batch: the scripts' time per record (us), the nodes' CPU per record (us), one
    /// script-run `INFO`'s time (us, with the guard), wall (ms).
    script_us: Vec<f64>,
    cpu_us: Vec<f64>,
    info_us: Vec<f64>,
    walls: Vec<f64>,
    failed: usize,
    /// Batches whose first document was not the new one afterwards.
    missing: usize,
}

impl Side {
    async fn new(env: &Env, redis: RedisSettings, guard: bool, n: usize) -> Result<Side, Error> {
        let cache = CacheSettings {
            // Generous: the figure is about cost, and a batch cut short on a busy machine
            // would spoil the comparison.
            redis_timeout: Duration::from_secs(1),
            guards: Guards {
                evictions: guard,
                ..Guards::default()
            },
            ..CacheSettings::default()
        };
        let prefix = cache.key_prefix.clone();
        let settings = InvalidatorSettings {
            redis,
            mode: InvalidationMode::Refresh,
            cache,
        };
        let inv = Invalidator::build(settings, &env.sdk).await?;
        Ok(Side {
            guard,
            inv,
            ids: ids_in_own_slots(n, u16::from(!guard), &prefix),
            batches: 0,
            records: 0,
            script_calls: 0,
            info_calls: 0,
            renames: 0,
            script_us: Vec::new(),
            cpu_us: Vec::new(),
            info_us: Vec::new(),
            walls: Vec::new(),
            failed: 0,
            missing: 0,
        })
    }

    fn event(&self, version: u64, bytes: usize) -> Value {
        let records = self
            .ids
            .iter()
            .map(|id| {
                let new = image(id, "19.99", version, bytes);
                records::record("MODIFY", id, Some(new), None, "NEW_IMAGE")
            })
            .collect();
        records::event(records)
    }

    /// A batch nobody measures: loads the script, caches the documents, records positions and
    /// takes the slots' epochs.
    async fn warm_up(&self, version: u64, bytes: usize) -> Result<(), Error> {
        let response = self.inv.handle(self.event(version, bytes)).await;
        if !response.batch_item_failures.is_empty() {
            return Err(format!(
                "a warm-up batch (guard {}) reported {} failures",
                on_off(self.guard),
                response.batch_item_failures.len()
            )
            .into());
        }
        Ok(())
    }

    /// One sample: `BATCHES_PER_SAMPLE` batches back to back, versions from `version` on.
    async fn measure(&mut self, nodes: &Nodes, version: u64, bytes: usize) -> Result<(), Error> {
        let events: Vec<Value> = (0..BATCHES_PER_SAMPLE as u64)
            .map(|i| self.event(version + i, bytes))
            .collect();
        let cpu = nodes.cpu_seconds().await?;
        nodes.resetstat().await?;
        for event in events {
            let started = Instant::now();
            let response = self.inv.handle(event).await;
            self.walls.push(stats::millis(started.elapsed()));
            self.failed += response.batch_item_failures.len();
        }
        let counted = nodes.commandstats().await?;
        let cpu = nodes.cpu_seconds().await? - cpu;
        let n = (self.ids.len() * BATCHES_PER_SAMPLE) as f64;
        let get = |name: &str| counted.get(name).copied().unwrap_or_default();
        let script = get("evalsha").usec + get("eval").usec;
        let info = get("info");
        self.script_us.push(script as f64 / n);
        self.cpu_us.push(cpu * 1e6 / n);
        if info.calls > 0 {
            self.info_us.push(info.usec as f64 / info.calls as f64);
        }
        self.batches += BATCHES_PER_SAMPLE;
        self.records += self.ids.len() * BATCHES_PER_SAMPLE;
        self.script_calls += get("evalsha").calls + get("eval").calls;
        self.info_calls += info.calls;
        self.renames += get("rename").calls;
        let version = version + BATCHES_PER_SAMPLE as u64 - 1;
        // Every record a write: a refresh that turned into a delete would be cheaper, and the
        // comparison void.
        let expected =
            Document::from_item(&item_of(&image(&self.ids[0], "19.99", version, bytes)))?
                .into_string();
        let cached = self
            .inv
            .cache()
            .get(&format!("product:{}", self.ids[0]))
            .await?;
        if cached.as_deref() != Some(expected.as_str()) {
            self.missing += 1;
        }
        Ok(())
    }

    fn per_record(&self, count: u64) -> f64 {
        count as f64 / self.records.max(1) as f64
    }

    fn failure(&self) -> Option<String> {
        if self.failed > 0 {
            Some(format!(
                "guard {}: the batches reported {} failures",
                on_off(self.guard),
                self.failed
            ))
        } else if self.renames != self.records as u64 {
            Some(format!(
                "guard {}: {} of {} refreshes wrote their document (RENAME); the others deleted",
                on_off(self.guard),
                self.renames,
                self.records
            ))
        } else if self.missing > 0 {
            Some(format!(
                "guard {}: a batch's new document was not in Redis after it",
                on_off(self.guard)
            ))
        } else {
            None
        }
    }
}

fn on_off(guard: bool) -> &'static str {
    if guard {
        "on"
    } else {
        "off"
    }
}

/// Alternating rounds of the same refresh batches with the guard on and off.
async fn compare(
    env: &Env,
    sizes: &Sizes,
    nodes: &Nodes,
    redis: RedisSettings,
) -> Result<(Side, Side), Error> {
    let n = sizes.refresh_records;
    let bytes = sizes.refresh_bytes;
    nodes.flushall().await?;
    let mut on = Side::new(env, redis.clone(), true, n).await?;
    let mut off = Side::new(env, redis, false, n).await?;
    // A Redis just emptied, declared so: refreshes write from the first record (see the
    // refresh figure).
    on.inv.cache().declare_empty().await?;
    let mut version = 1;
    for _ in 0..2 {
        on.warm_up(version, bytes).await?;
        off.warm_up(version, bytes).await?;
        version += 1;
    }
    // Which side goes first alternates too; both sides' batches of a round carry its versions.
    alternate(
        sizes.guard_rounds,
        [1, 1],
        Order::Rotate,
        async |side, round| {
            let version = version + (round * BATCHES_PER_SAMPLE) as u64;
            let guarded = if side == PRODUCT { &mut on } else { &mut off };
            guarded.measure(nodes, version, bytes).await
        },
    )
    .await?;
    Ok((on, off))
}

/// The verdict rests on the nodes' CPU time (`INFO cpu`), not on commandstats' `usec`, which
/// is elapsed time: another process on the machine taking the CPU from Redis mid-script lands
/// in it (seen: a batch's script time doubled), never in CPU time. Medians over the samples.
fn row_of(on: &Side, off: &Side, net: Net, target: &str, budget: f64) -> Row {
    let n = on.ids.len();
    let median = stats::median;
    let (script_on, script_off) = (median(&on.script_us), median(&off.script_us));
    let note = format!(
        "medians of {} alternating samples of {BATCHES_PER_SAMPLE} batches each side, {n} records of ~5 KB a batch; with the guard {:.3} script calls and {:.3} INFO stats per record, one INFO {:.1} us (commandstats); the apply script (evalsha usec, nested commands included) {script_on:.2} us per record vs {script_off:.2} us: {:+.2} us for the INFO and its 1.3 KB reply made a Lua string and searched; {} INFO without the guard; wall per batch {:.1} ms vs {:.1} ms{}",
        on.batches / BATCHES_PER_SAMPLE,
        on.per_record(on.script_calls),
        on.per_record(on.info_calls),
        median(&on.info_us),
        script_on - script_off,
        off.info_calls,
        median(&on.walls),
        median(&off.walls),
        if net == Net::Proxy {
            "; server-side cost, so the proxy changes little (INFO adds no round trip)"
        } else {
            ""
        }
    );
    Row {
        figure: FIGURE,
        what: format!("refresh, {target}: Redis server CPU per record"),
        net,
        judged_on: "INFO cpu (sys+user), all nodes",
        unit: Unit::Micros,
        measured: median(&on.cpu_us),
        baseline: Some(median(&off.cpu_us)),
        baseline_label: "eviction guard off (the design before it)".into(),
        budget: Budget::RatioAtMost(budget),
        note,
        failure: on.failure().or_else(|| off.failure()),
    }
}

pub async fn run(
    env: &Env,
    sizes: &Sizes,
    net: Net,
    cluster: &RedisCluster,
) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();

    let single = Nodes::connect(&[env.redis.server().port()]).await?;
    let (on, off) = compare(env, sizes, &single, RedisSettings::new(env.url(net))).await?;
    // One INFO per script call of up to 1,000 keys (a batch goes in three calls): about 0.1 us
    // per record, lost in the noise, which moved the sides' medians up to 16 % apart either
    // way between runs on a shared 2-core machine. An INFO per key would cost 1.5x, as on the
    // cluster.
    rows.push(row_of(&on, &off, net, "single node", SINGLE_BUDGET));
    drop((on, off));
    single.flushall().await?;

    cluster.set_delay(match net {
        Net::Loopback => Duration::ZERO,
        Net::Proxy => env.delay(),
    });
    let nodes = Nodes::connect(&cluster.ports()).await?;
    let redis = RedisSettings {
        cluster: true,
        ..RedisSettings::new(cluster.url())
    };
    let (on, off) = compare(env, sizes, &nodes, redis).await?;
    rows.push(row_of(
        &on,
        &off,
        net,
        "3-node cluster, a slot per record",
        CLUSTER_BUDGET,
    ));
    nodes.flushall().await?;
    Ok(rows)
}
