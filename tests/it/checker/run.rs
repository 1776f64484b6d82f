//! One checker run, as orchestration: start the system under test and the actors, inject the
//! faults, wait for the actors to stop and the stream to drain, run the checks, and report.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use local_stack::services::Endpoint;
use tokio::sync::watch;

use super::actors::{self, Phase, Shared};
use super::ballast;
use super::chaos;
use super::config::Config;
use super::faults::FailingCache;
use super::feeder::Feeder;
use super::history::{ms, Clock, Write, WriteKind};
use super::inspector;
use super::invariants;
use super::monitor;
use super::report::{Findings, Report};
use super::system::{Redis, Sut};
use crate::support::init_logging;

pub async fn run(cfg: Config) -> Report {
    init_logging();
    let clock = Clock::start();
    let (mut redis, sut) = Sut::start(&cfg).await;
    sut.declare_empty().await;
    let (progress, progress_rx) = watch::channel(0);
    let shared = Arc::new(Shared::new(&cfg, clock, progress, &sut));
    // Before any actor: the pressure is there from the first write.
    let ballast = match cfg.memory_pressure {
        Some(full) => {
            let (ports, primaries) = match &redis {
                Redis::Single(server) => (vec![server.port()], 1),
                // The primary evicts; its replica follows its DELs.
                Redis::Serverless(cache) => (vec![cache.backend().port()], 1),
                Redis::Cluster(cluster) => {
                    let roles = cluster.roles().await.expect("cluster roles");
                    (cluster.ports(), roles.iter().filter(|r| r.primary).count())
                }
            };
            let target = ballast::Target {
                cluster: sut.look_cluster,
                url: sut.look_url.clone(),
                nodes: sut.nodes.clone(),
                ports,
            };
            let prefilled = ballast::prefill(&target, full, primaries).await;
            println!(
                "[{}] {prefilled} ballast keys until every primary evicted",
                cfg.name
            );
            Some(tokio::spawn(ballast::fill(
                target,
                full,
                prefilled,
                shared.phase.subscribe(),
            )))
        }
        None => None,
    };
    // On serverless, every eviction of the run is watched (its data loss is a FLUSHALL, so
    // the node and its notifications stay up): which of the product's keys `volatile-lru`
    // takes is what the eviction guard there is about.
    let evictions = match (&cfg.memory_pressure, &redis) {
        (Some(_), Redis::Serverless(cache)) => {
            Some(ballast::watch_evictions(cache.backend().port()).await)
        }
        _ => None,
    };

    // GETs each node has served so far: the run's are counted from here (see `NodeGets`).
    let gets_before = node_gets(&redis).await;
    let closing_item = closing_item(&redis, &sut, &shared.items).await;
    let (expected_tx, expected_rx) = watch::channel(None);
    let invalidator = sut.invalidator(
        FailingCache::new(sut.cache(&sut.settings).await),
        &sut.settings,
    );
    // Both settings of a run that flips the version attribute are built up front.
    let flipped = match cfg.flip_version_attribute {
        Some(_) => Some(sut.invalidator(
            FailingCache::new(sut.cache(&sut.flipped).await),
            &sut.flipped,
        )),
        None => None,
    };
    let feeder = Feeder::start(
        &cfg,
        shared.clone(),
        sut.stream.clone(),
        invalidator,
        flipped,
    )
    .await;
    let feeder = tokio::spawn(feeder.run(expected_rx));
    let writers = actors::spawn_writers(&cfg, &shared);
    let readers = actors::spawn_readers(&cfg, &sut, &shared).await;
    let inspections = inspector::spawn(&sut, &shared).await;
    let monitoring = monitor::spawn(&sut, &shared).await;

    // On this task (not spawned): a restarted (or revived) redis-server is tied to the thread
    // that spawns it.
    let herd_settings = chaos::herd_settings(&sut.settings);
    // Readers keep reading until the chaos is over too, so a run whose writers stop during a
    // failover still reads after it.
    let (chaos_over, mut chaos_over_rx) = watch::channel(false);
    let chaos_progress = progress_rx.clone();
    let chaos = async {
        let chaos = chaos::inject(
            &cfg,
            &sut,
            &herd_settings,
            &mut redis,
            &shared,
            chaos_progress,
        )
        .await;
        chaos_over.send_replace(true);
        chaos
    };
    let progress_lines = progress_lines(&cfg, &shared, progress_rx);
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
        shared.phase.send_replace(Phase::Draining);
        shared.budget.written.notify_waiters();
        chaos_over_rx
            .wait_for(|over| *over)
            .await
            .expect("the chaos ends");
        writes.push(closing_change(&shared, &writes, closing_item).await);
        expected_tx.send_replace(Some(writes.len()));
        let feed = feeder.await.expect("feeder task");
        shared.phase.send_replace(Phase::Done);
        let mut reads = Vec::new();
        for r in readers.tasks {
            reads.extend(r.await.expect("reader task"));
        }
        (writes, writers_done, feed, reads)
    };
    let (mut chaos, (writes, writers_done, feed, reads), ()) =
        tokio::join!(chaos, actors, progress_lines);
    let run_time = clock.now();
    if let Some(ballast) = ballast {
        let filled = ballast.await.expect("ballast task");
        chaos.faults.add("ballast keys written", filled.written);
        chaos.faults.add("keys evicted", filled.evicted);
    }
    if let Some(watch) = evictions {
        let evicted = ballast::ProductEvictions::of(&watch.stop().await, &sut.settings.key_prefix);
        chaos.faults.add("documents evicted", evicted.documents);
        chaos.faults.add("positions evicted", evicted.positions);
        chaos.faults.add("leases evicted", evicted.leases);
    }
    // Before the checks at rest, which read the primaries.
    let served_gets = NodeGets::between(gets_before, node_gets(&redis).await);
    let mut inspected = inspections.await.expect("inspector task");
    // The change monitor's final look (under way since the run was done) and the inspection at
    // rest each wait out a grace period where they find suspects, and both only read: together.
    let (monitored, ()) = tokio::join!(
        async { monitoring.await.expect("monitor task") },
        inspector::at_rest(&sut, &shared.items, &mut inspected),
    );
    println!(
        "[{}] drained at {:.1} s; checking the cache and replaying the stream",
        cfg.name,
        ms(run_time) / 1e3
    );

    let mut conn = sut.redis_connection().await;
    let mut mismatches = invariants::cache_matches_table(
        &sut,
        &mut conn,
        &shared.items,
        cfg.herds,
        &feed,
        writes.len(),
    )
    .await;
    if let Redis::Cluster(cluster) = &redis {
        let roles = cluster.roles().await.expect("cluster roles");
        mismatches.extend(invariants::replicas_match_primaries(&roles).await);
    }
    // The replay is the invalidator as it ended the run: with the other setting it would meet
    // positions of the other kind, which it applies as deletes by design.
    let settings = if shared.flipped.invalidator.load(Ordering::SeqCst) {
        &sut.flipped
    } else {
        &sut.settings
    };
    let replay = invariants::replay_changes_nothing(
        &sut,
        settings,
        &mut conn,
        clock,
        cfg.memory_pressure.is_some(),
    )
    .await;
    let serverless = match &redis {
        Redis::Serverless(cache) => Some([
            cache.counters(Endpoint::Primary),
            cache.counters(Endpoint::Reader),
        ]),
        _ => None,
    };
    drop(redis);
    println!(
        "[{}] replayed {} records by {:.1} s; analysing the history",
        cfg.name,
        replay.replayed,
        ms(clock.now()) / 1e3
    );

    Report::new(
        &cfg,
        clock,
        shared.items.clone(),
        Findings {
            writes,
            reads,
            feed,
            chaos,
            replay,
            mismatches,
            table_reads: readers.table_reads.load(Ordering::Relaxed),
            slowed: readers.slowed.load(Ordering::Relaxed),
            batch_table_reads: readers.batch_table_reads.load(Ordering::Relaxed),
            flipped_reads: shared.flipped.reads.load(Ordering::Relaxed),
            run_time,
            writers_done,
            herd_lease: herd_settings.lease,
            inspected,
            monitored,
            served_gets,
            serverless,
        },
    )
}

/// An item whose key is on the shard of the node clients start from (on a cluster): neither the
/// failover nor the kill takes that shard (`chaos.rs`), so its closing change keeps its
/// position.
async fn closing_item(redis: &Redis, sut: &Sut, items: &[String]) -> u16 {
    let Redis::Cluster(cluster) = redis else {
        return 0;
    };
    let entry = cluster.ports()[0];
    let roles = cluster.roles().await.expect("cluster roles");
    let shard = roles
        .iter()
        .find(|r| r.port == entry && r.primary)
        .expect("the entry node is a primary at the start");
    let on_shard = items.iter().position(|id| {
        let key = format!("{}{id}", sut.settings.key_prefix);
        shard.serves(product_cache::cache::slots::slot_of(&key))
    });
    on_shard.expect("an item on the entry node's shard") as u16
}

/// The run's closing change, after every writer and every fault: a `PutItem` of `item`, the
/// stream's last record, on the topology the run ends with. Without it, a change lost with a
/// killed primary could be the stream's last (a fast machine's writers used up their budget
/// during the replication cut before the kill), and nothing later showed the change monitor
/// that the invalidator had got past it: it judged that change pending, as it must. (Writers
/// that went on through the kill instead rewrote the lost changes' items at once, and the run
/// without confirmation then saw no lost invalidation at all.)
async fn closing_change(shared: &Shared, writes: &[Write], item: u16) -> Write {
    let index = writes
        .iter()
        .filter(|w| w.item == item)
        .map(|w| w.index)
        .max()
        .unwrap_or(0)
        + 1;
    let id = &shared.items[item as usize];
    let start = shared.clock.now();
    actors::put(shared, id, index)
        .await
        .unwrap_or_else(|e| panic!("the closing change of {id} failed: {e:?}"));
    Write {
        item,
        index,
        kind: WriteKind::Put,
        start,
        end: shared.clock.now(),
    }
}

/// Each node's `cmdstat_get` calls and whether it is a primary now, on a cluster.
async fn node_gets(redis: &Redis) -> Vec<(u16, bool, u64)> {
    let Redis::Cluster(cluster) = redis else {
        return Vec::new();
    };
    let roles = cluster.roles().await.unwrap_or_default();
    let mut out = Vec::new();
    for role in roles.iter().filter(|r| !r.failed) {
        let gets = crate::support::command_calls(role.port, "get").await;
        out.push((role.port, role.primary, gets));
    }
    out
}

/// The `GET`s each node of a cluster served during a run (hits, and the batch reads' `GET`s),
/// with its role at the start and at the end: with replica reads, the nodes that were replicas
/// throughout must have served some, which shows the replicas were really read from (a
/// client that learned the map on the empty cluster, before the replicas had a replication
/// offset, saw none of them). A node revived during the run starts counting from 0.
#[derive(Debug, Clone, Default)]
pub struct NodeGets(pub Vec<NodeGet>);

#[derive(Debug, Clone)]
pub struct NodeGet {
    pub port: u16,
    pub primary_at_start: bool,
    pub primary_at_end: bool,
    pub gets: u64,
}

impl NodeGets {
    fn between(before: Vec<(u16, bool, u64)>, after: Vec<(u16, bool, u64)>) -> Self {
        Self(
            after
                .into_iter()
                .filter_map(|(port, primary_at_end, end)| {
                    let (_, primary_at_start, start) =
                        before.iter().find(|(p, _, _)| *p == port)?;
                    Some(NodeGet {
                        port,
                        primary_at_start: *primary_at_start,
                        primary_at_end,
                        gets: end.saturating_sub(*start),
                    })
                })
                .collect(),
        )
    }

    /// GETs served by nodes that were replicas at the start and at the end.
    pub fn by_replicas(&self) -> u64 {
        self.0
            .iter()
            .filter(|n| !n.primary_at_start && !n.primary_at_end)
            .map(|n| n.gets)
            .sum()
    }
}

impl std::fmt::Display for NodeGets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GETs served per node:")?;
        let role = |primary: bool| if primary { "primary" } else { "replica" };
        for n in &self.0 {
            write!(
                f,
                " :{} ({} -> {}) {};",
                n.port,
                role(n.primary_at_start),
                role(n.primary_at_end),
                n.gets
            )?;
        }
        write!(f, " by replicas throughout: {}", self.by_replicas())
    }
}

/// A line per tenth of the run, for long runs (`--nocapture`). A run that lasts by time (the
/// game day) has no tenths of its operations to report.
async fn progress_lines(cfg: &Config, shared: &Shared, mut progress: watch::Receiver<u64>) {
    if cfg.write_pause.is_some() {
        return;
    }
    let clock = shared.clock;
    for tenth in 1..=10 {
        if progress.wait_for(|p| *p >= tenth * 10).await.is_err() {
            break;
        }
        println!(
            "[{}] {:>3}% of the run ({} ops or {:?}) at {:.1} s: {} writes, {} reads, {} records \
             acknowledged",
            cfg.name,
            tenth * 10,
            cfg.ops,
            cfg.max_duration,
            ms(clock.now()) / 1e3,
            shared.budget.writes.load(Ordering::Relaxed),
            shared.budget.reads.load(Ordering::Relaxed),
            shared.acked.load(Ordering::Relaxed),
        );
    }
}
