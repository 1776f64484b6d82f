//! Faults injected at points of the run's progress: one data loss (a Redis restart on the same
//! port, empty, or a `FLUSHALL`), herds of concurrent reads of a cold key, each herd one check of
//! invariant 4, in some runs the flips of the version attribute, one per function, and on a
//! cluster two failovers: a `CLUSTER FAILOVER` on one shard's replica, and another shard's
//! primary killed outright once its replica's link has been cut, then revived as a replica.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use local_stack::services::RedisCluster;
use product_cache::config::CacheSettings;
use product_cache::read::{BatchIds, CacheStatus, Lookup};
use tokio::sync::watch;

use super::actors::{Phase, Shared};
use super::config::{Cluster, Config, DataLoss, Deployment, GameDay};
use super::history::{ms, Nanos, Tally};
use super::system::{node_connection, Redis, Sut};
use crate::support::Counting;

/// The herds' settings: a lease long enough that one fill fits in it even on a loaded machine,
/// since the claim is one table read per lease period.
pub fn herd_settings(settings: &CacheSettings) -> CacheSettings {
    CacheSettings {
        lease: Duration::from_secs(2),
        lease_wait: Duration::from_secs(4),
        redis_timeout: Duration::from_secs(1),
        ..settings.clone()
    }
}

pub struct Chaos {
    pub faults: Tally,
    /// Violations of invariant 4.
    pub herd_violations: Vec<String>,
    /// What happened when, for the report.
    pub events: Vec<String>,
    /// When the cluster's topology was changing, for the report's reads around them.
    pub windows: Vec<Window>,
}

/// A stretch of the run during which a failover was under way.
#[derive(Debug, Clone)]
pub struct Window {
    pub what: &'static str,
    pub from: Nanos,
    pub to: Nanos,
}

/// What happens at a point of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    DataLoss,
    FlipInvalidator,
    FlipReaders,
    Herd(usize),
    Failover,
    Kill,
    GameDay,
}

/// The percent of the run's operations a fraction of them stands for, within the run.
fn percent(fraction: f64) -> u64 {
    (fraction * 100.0).round().clamp(1.0, 99.0) as u64
}

/// Herds spread over 10% to 90% of the run, the data loss at 45%, the flips where the config
/// puts them, on a cluster the failover at 33% and the kill at 67%; an event due after the
/// writers stopped is skipped. Restarts and revivals need `redis` here: a restarted
/// redis-server is tied to the thread that spawns it.
pub async fn inject(
    cfg: &Config,
    sut: &Sut,
    herd_settings: &CacheSettings,
    redis: &mut Redis,
    shared: &Shared,
    mut progress: watch::Receiver<u64>,
) -> Chaos {
    let clock = shared.clock;
    let mut schedule: Vec<(u64, Event)> = (0..cfg.herds)
        .map(|h| (10 + 80 * h as u64 / cfg.herds.max(1) as u64, Event::Herd(h)))
        .collect();
    match cfg.deployment {
        // The game day is the run: it starts at once, and the budget ends with it.
        Deployment::Cluster(Cluster {
            game_day: Some(_), ..
        }) => schedule.push((0, Event::GameDay)),
        Deployment::Cluster(_) => {
            schedule.push((45, Event::DataLoss));
            schedule.push((33, Event::Failover));
            schedule.push((67, Event::Kill));
        }
        Deployment::Single | Deployment::Serverless => schedule.push((45, Event::DataLoss)),
    }
    if let Some(at) = cfg.flip_version_attribute {
        schedule.push((percent(at.invalidator), Event::FlipInvalidator));
        schedule.push((percent(at.readers), Event::FlipReaders));
    }
    schedule.sort();
    let flipped_to = &sut.flipped.version_attribute;
    let mut faults = Tally::default();
    let mut herd_violations = Vec::new();
    let mut events = Vec::new();
    let mut windows = Vec::new();
    // The shard that failed over, by its new primary: the kill picks another.
    let mut failed_over = None;
    for (pct, what) in schedule {
        progress.wait_for(|p| *p >= pct).await.unwrap();
        if *shared.phase.borrow() != Phase::Running {
            faults.add("chaos events skipped (run over)", 1);
            continue;
        }
        match what {
            Event::DataLoss => {
                let event = lose_data(cfg.data_loss, redis, shared).await;
                faults.add(data_loss_fault(cfg.data_loss), 1);
                tracing::info!(at_ms = ms(clock.now()), event, "redis lost its data");
                events.push(event);
            }
            Event::FlipInvalidator | Event::FlipReaders => {
                let (who, flag) = match what {
                    Event::FlipInvalidator => ("invalidator", &shared.flipped.invalidator),
                    _ => ("readers", &shared.flipped.readers),
                };
                flag.store(true, Ordering::SeqCst);
                faults.add("version attribute flips", 1);
                let event = format!(
                    "{who} flipped to version attribute {flipped_to:?} at {:.1} ms ({pct}% of \
                     the ops)",
                    ms(clock.now())
                );
                tracing::info!(event, "version attribute flipped");
                events.push(event);
            }
            Event::Failover => {
                let Redis::Cluster(cluster) = redis else {
                    unreachable!("failovers are scheduled on clusters only")
                };
                let (event, window, promoted) = failover(cluster, shared).await;
                faults.add("failovers", 1);
                tracing::info!(event, "failover");
                events.push(event);
                windows.push(window);
                failed_over = Some(promoted);
            }
            Event::Kill => {
                let (Redis::Cluster(cluster), Deployment::Cluster(settings)) =
                    (&mut *redis, cfg.deployment)
                else {
                    unreachable!("kills are scheduled on clusters only")
                };
                let (event, window) =
                    kill(cluster, settings.cut_before_kill, failed_over, shared).await;
                faults.add("primaries killed", 1);
                tracing::info!(event, "primary killed");
                events.push(event);
                windows.push(window);
                // The readers' clients have a second on the new topology before the run may
                // end (it waits for the chaos), however early the writers stop.
                tokio::time::sleep(SETTLE).await;
            }
            Event::GameDay => {
                let (Redis::Cluster(cluster), Deployment::Cluster(settings)) =
                    (&mut *redis, cfg.deployment)
                else {
                    unreachable!("game days are run on clusters only")
                };
                let plan = settings.game_day.expect("a game day's settings");
                let (lines, stretches) = game_day(cluster, plan, shared, &mut faults).await;
                for line in &lines {
                    tracing::info!(event = %line, "game day");
                }
                events.extend(lines);
                windows.extend(stretches);
                shared.budget.end_now();
            }
            Event::Herd(h) => {
                events.push(format!("herd on cold-{h} at {:.1} ms", ms(clock.now())));
                let id = format!("cold-{h}");
                // Under memory pressure the key's document or lease may be evicted during the
                // herd, and a read after that is a new miss: watched on the key's node.
                let watch = match (cfg.memory_pressure, &*redis) {
                    (None, _) => None,
                    (Some(_), Redis::Single(server)) => Some(server.port()),
                    (Some(_), Redis::Serverless(cache)) => Some(cache.backend().port()),
                    (Some(_), Redis::Cluster(cluster)) => {
                        let key = format!("{}{id}", sut.settings.key_prefix);
                        let slot = product_cache::cache::slots::slot_of(&key);
                        Some(
                            cluster
                                .primary_of_slot(slot)
                                .await
                                .expect("the key's primary"),
                        )
                    }
                };
                // As many of the herd's reads in batch requests as of the readers.
                let batch_every = (cfg.batch_readers > 0).then(|| cfg.readers / cfg.batch_readers);
                let outcome =
                    herd(sut, herd_settings, &id, cfg.herd_size, batch_every, watch).await;
                faults.add("herds", 1);
                if let Some(v) = outcome {
                    herd_violations.push(v);
                }
            }
        }
    }
    Chaos {
        faults,
        herd_violations,
        events,
        windows,
    }
}

/// How long the run goes on after the kill's window, at least.
const SETTLE: Duration = Duration::from_secs(1);

/// `CLUSTER FAILOVER` on the replica of the shard whose primary has the lowest port: the
/// coordinated handover of a maintenance, nothing lost. Returns the event's line, its window and
/// the new primary.
async fn failover(cluster: &RedisCluster, shared: &Shared) -> (String, Window, u16) {
    let clock = shared.clock;
    let primary = cluster.primary_except(&[]).await.expect("a primary");
    let replica = cluster.replica_of(primary).await.expect("a replica");
    let from = clock.now();
    cluster.failover(replica).await.expect("CLUSTER FAILOVER");
    let to = clock.now();
    let event = format!(
        "CLUSTER FAILOVER on :{replica} (replica of :{primary}) at {:.1} ms, primary by {:.1} ms",
        ms(from),
        ms(to)
    );
    let window = Window {
        what: "failover",
        from,
        to,
    };
    (event, window, replica)
}

/// Another shard's primary killed outright (SIGKILL), as a lost instance, and the cluster
/// promotes its replica. With `cut`, the replica's link is cut that long before, so the primary
/// holds writes its replica never got and the replica is promoted without them. Once promoted,
/// the killed node is started again and rejoins as its replica; the window ends when that
/// replica is in sync, from when a `WAIT` for one replica can be satisfied again. The victim is
/// neither the shard that failed over nor the node clients start from (`Sut::redis`), so new
/// clients can still find the cluster meanwhile.
async fn kill(
    cluster: &mut RedisCluster,
    cut: Option<Duration>,
    failed_over: Option<u16>,
    shared: &Shared,
) -> (String, Window) {
    let clock = shared.clock;
    let entry = cluster.ports()[0];
    let roles = cluster.roles().await.expect("cluster roles");
    let mut primaries: Vec<u16> = roles
        .iter()
        .filter(|r| r.primary && Some(r.port) != failed_over)
        .map(|r| r.port)
        .collect();
    primaries.sort_unstable_by_key(|&p| (p == entry, p));
    let primary = primaries[0];
    let replica = cluster.replica_of(primary).await.expect("a replica");
    let from = clock.now();
    let mut event = String::new();
    if let Some(cut) = cut {
        cluster
            .cut_replication(replica)
            .await
            .expect("replication cut");
        event = format!(
            "replication :{primary} -> :{replica} cut at {:.1} ms; ",
            ms(from)
        );
        tokio::time::sleep(cut).await;
    }
    // The replica's first: the primary's, read later, cannot be behind it.
    let replicated = cluster.replication_offset(replica).await.expect("offset");
    let ahead = cluster
        .replication_offset(primary)
        .await
        .expect("offset")
        .saturating_sub(replicated);
    let killed = clock.now();
    let promoted = cluster.kill(primary).await.expect("replica promoted");
    assert_eq!(promoted, replica, "the shard's one replica was promoted");
    let promoted_at = clock.now();
    cluster
        .mend_replication(replica)
        .await
        .expect("replication mended");
    cluster.revive(primary).await.expect("killed node revived");
    let revived = clock.now();
    cluster
        .await_in_sync(primary)
        .await
        .expect("the revived node syncs");
    let to = clock.now();
    let _ = write!(
        event,
        "primary :{primary} killed at {:.1} ms, {ahead} bytes of replication ahead of \
         :{replica}; :{replica} promoted by {:.1} ms; :{primary} back as its replica by {:.1} \
         ms, in sync by {:.1} ms",
        ms(killed),
        ms(promoted_at),
        ms(revived),
        ms(to)
    );
    let window = Window {
        what: if cut.is_some() {
            "cut, kill and revival"
        } else {
            "kill and revival"
        },
        from,
        to,
    };
    (event, window)
}

/// Issue 17's game day, in sequence: a healthy stretch; a primary (not the entry node) killed
/// and left down for `plan.down`, its shard served by the promoted replica alone (a primary
/// with no replica: every batch there is confirmed by the replicas that are there, none); the
/// killed node started again, rejoining as the replica, until in sync; another primary stalled
/// (SIGSTOP) for `plan.stall`, which the cluster fails over meanwhile; resumed, rejoining as a
/// replica, until in sync; a last healthy stretch. Returns the events' lines and the windows:
/// `healthy`, `under-replicated`, `stalled`, `restored` (the report and the assertions read
/// them by name).
async fn game_day(
    cluster: &mut RedisCluster,
    plan: GameDay,
    shared: &Shared,
    faults: &mut Tally,
) -> (Vec<String>, Vec<Window>) {
    let clock = shared.clock;
    let mut lines = Vec::new();
    let mut windows = Vec::new();
    let entry = cluster.ports()[0];

    let from = clock.now();
    tokio::time::sleep(plan.healthy).await;
    windows.push(Window {
        what: "healthy",
        from,
        to: clock.now(),
    });

    // Killed, left down: the promoted replica serves its shard alone.
    let victim = cluster.primary_except(&[entry]).await.expect("a primary");
    let killed = clock.now();
    let promoted = cluster.kill(victim).await.expect("replica promoted");
    let promoted_at = clock.now();
    faults.add("primaries killed", 1);
    tokio::time::sleep(
        plan.down
            .saturating_sub(Duration::from_nanos(promoted_at - killed)),
    )
    .await;
    let down_to = clock.now();
    windows.push(Window {
        what: "under-replicated",
        from: promoted_at,
        to: down_to,
    });
    cluster.revive(victim).await.expect("killed node revived");
    cluster
        .await_in_sync(victim)
        .await
        .expect("the revived node syncs");
    let synced = clock.now();
    lines.push(format!(
        "primary :{victim} killed at {:.1} ms; :{promoted} primary alone from {:.1} ms; \
         :{victim} back at {:.1} ms, its replica in sync by {:.1} ms",
        ms(killed),
        ms(promoted_at),
        ms(down_to),
        ms(synced)
    ));
    tokio::time::sleep(plan.healthy).await;

    // Stalled: connections open, nothing answers; the cluster fails it over meanwhile.
    let stalled = cluster
        .primary_except(&[entry, promoted])
        .await
        .expect("a primary");
    let replica = cluster.replica_of(stalled).await.expect("a replica");
    let stall_from = clock.now();
    cluster.stall(stalled);
    faults.add("nodes stalled", 1);
    tokio::time::sleep(plan.stall).await;
    cluster.resume(stalled);
    let stall_to = clock.now();
    windows.push(Window {
        what: "stalled",
        from: stall_from,
        to: stall_to,
    });
    // Stalled past `cluster-node-timeout`, it was failed over to its replica: it comes back as
    // that replica's replica. (Had the cluster not promoted the replica, it is primary still.)
    let roles = cluster.roles().await.expect("cluster roles");
    let now_replica = roles.iter().any(|r| r.port == replica && r.primary);
    if now_replica {
        cluster
            .await_role(stalled, false)
            .await
            .expect("the stalled node rejoins as a replica");
        cluster
            .await_in_sync(stalled)
            .await
            .expect("the stalled node syncs");
    }
    let restored = clock.now();
    lines.push(format!(
        "primary :{stalled} stalled from {:.1} ms to {:.1} ms; {} by {:.1} ms",
        ms(stall_from),
        ms(stall_to),
        if now_replica {
            "failed over meanwhile, back as a replica in sync"
        } else {
            "still primary"
        },
        ms(restored)
    ));
    tokio::time::sleep(plan.healthy).await;
    windows.push(Window {
        what: "restored",
        from: restored,
        to: clock.now(),
    });
    (lines, windows)
}

/// The fault tally's name for a data loss.
pub fn data_loss_fault(loss: DataLoss) -> &'static str {
    match loss {
        DataLoss::Restart => "redis restarts",
        DataLoss::Flushall => "redis FLUSHALLs",
    }
}

/// Empties Redis the configured way, between the generation marks the feeder replays on, and
/// returns the event's line for the report.
async fn lose_data(loss: DataLoss, redis: &mut Redis, shared: &Shared) -> String {
    let clock = shared.clock;
    match (loss, redis) {
        (DataLoss::Restart, Redis::Single(server)) => {
            shared.generation.begun.fetch_add(1, Ordering::SeqCst);
            server.restart().await.expect("redis-server restarts");
            shared.generation.done.fetch_add(1, Ordering::SeqCst);
            format!("redis restarted at {:.1} ms", ms(clock.now()))
        }
        (DataLoss::Restart, Redis::Cluster(_) | Redis::Serverless(_)) => {
            unreachable!("Sut::start refuses it")
        }
        (DataLoss::Flushall, Redis::Single(server)) => {
            let port = server.port();
            let (at, uptime) = flush(&[port], shared).await;
            format!(
                "redis FLUSHALL at {at:.1} ms (no restart: uptime {} s)",
                uptime[0]
            )
        }
        (DataLoss::Flushall, Redis::Serverless(cache)) => {
            // On its primary, behind the endpoint: what a FLUSHALL through the endpoint does,
            // the replica following.
            let (at, uptime) = flush(&[cache.backend().port()], shared).await;
            format!(
                "serverless FLUSHALL at {at:.1} ms (no restart: uptime {} s)",
                uptime[0]
            )
        }
        (DataLoss::Flushall, Redis::Cluster(cluster)) => {
            // Each node says what it is (`ROLE`): one node's `CLUSTER NODES` can still show the
            // shard of the earlier failover the old way round, and a FLUSHALL sent to what has
            // become a replica is refused.
            let roles = cluster.roles().await.expect("cluster roles");
            let mut primaries = Vec::new();
            for role in roles.iter().filter(|r| !r.failed) {
                let mut conn = node_connection(role.port).await;
                let said: Vec<redis::Value> = redis::cmd("ROLE")
                    .query_async(&mut conn)
                    .await
                    .expect("ROLE");
                if matches!(said.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                    primaries.push(role.port);
                }
            }
            let (at, uptime) = flush(&primaries, shared).await;
            format!(
                "FLUSHALL on every primary ({}) at {at:.1} ms (no restart: uptimes {uptime:?} s)",
                primaries
                    .iter()
                    .map(|p| format!(":{p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
}

/// `FLUSHALL` on each of `ports`, between the generation marks; checks that no node restarted
/// meanwhile. Returns when it was done, and each node's uptime after it.
async fn flush(ports: &[u16], shared: &Shared) -> (f64, Vec<u64>) {
    let mut conns = Vec::new();
    for &port in ports {
        let mut conn = node_connection(port).await;
        let before = uptime(&mut conn).await;
        conns.push((conn, before));
    }
    shared.generation.begun.fetch_add(1, Ordering::SeqCst);
    for (conn, _) in &mut conns {
        redis::cmd("FLUSHALL")
            .query_async::<()>(conn)
            .await
            .expect("FLUSHALL");
    }
    shared.generation.done.fetch_add(1, Ordering::SeqCst);
    let at = ms(shared.clock.now());
    let mut uptimes = Vec::new();
    for (conn, before) in &mut conns {
        let after = uptime(conn).await;
        assert!(after >= *before, "redis restarted during FLUSHALL");
        uptimes.push(after);
    }
    (at, uptimes)
}

/// `uptime_in_seconds` from `INFO server`.
async fn uptime(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .expect("INFO server");
    info.lines()
        .find_map(|l| l.strip_prefix("uptime_in_seconds:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no uptime_in_seconds in INFO: {info}"))
}

/// `n` concurrent reads of a key nobody has read: returns a violation of invariant 4, if any.
/// Every `batch_every`th read is a batch request for the key (alone: a batch's other products
/// would be table reads of their own), through the batch path's leases and waits, each
/// `BatchGetItem` one table read. With `evictions_on` (the key's node, under memory pressure),
/// each eviction of the key's document or lease during the herd allows one table read more:
/// the cache forgot, and the next read is a new miss.
async fn herd(
    sut: &Sut,
    settings: &CacheSettings,
    id: &str,
    n: usize,
    batch_every: Option<usize>,
    evictions_on: Option<u16>,
) -> Option<String> {
    let cache = sut.cache(settings).await;
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
    let store = Counting::new(sut.store());
    let read_path = Arc::new(sut.read_path(cache, store, settings));
    let watch = match evictions_on {
        Some(port) => Some(super::ballast::watch_evictions(port).await),
        None => None,
    };
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let batch = BatchIds::parse(Some(&format!("ids={id}")), settings.key_type)
        .expect("a herd's key makes a valid batch");
    let mut batches = 0;
    for i in 0..n {
        let read_path = read_path.clone();
        let id = id.to_owned();
        if batch_every.is_some_and(|every| i % every == every - 1) {
            batches += 1;
            let batch = batch.clone();
            set.spawn(async move {
                let mut answer = read_path.get_many(&batch).await;
                let entry = answer.entries.pop().expect("the batch's one product");
                (entry.status, entry.result)
            });
        } else {
            set.spawn(async move { read_path.get(&id).await });
        }
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
    let key = format!("{}{id}", settings.key_prefix);
    let ours = [key.clone(), product_cache::cache::lease_key(&key)];
    let evicted = match watch {
        Some(watch) => watch
            .stop()
            .await
            .iter()
            .filter(|k| ours.contains(k))
            .count(),
        None => 0,
    };
    let allowed = 1 + evicted + (elapsed.as_nanos() / settings.lease.as_nanos()) as usize;
    (reads > allowed || wrong > 0 || statuses.contains_key(CacheStatus::Bypass.as_str())).then(
        || {
            format!(
                "{n} concurrent reads of {id} made {reads} table reads in {elapsed:?} \
                 (allowed {allowed}, {evicted} of them for evictions of its keys); answers \
                 {statuses:?} ({batches} in batch requests), {wrong} not `not found`"
            )
        },
    )
}
