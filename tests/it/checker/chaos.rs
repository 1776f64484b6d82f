//! Faults injected at points of the run's progress: one data loss (a Redis restart on the same
//! port, empty, or a `FLUSHALL`), herds of concurrent reads of a cold key, each herd one check of
//! invariant 4, and in some runs the flips of the version attribute, one per function.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use local_stack::services::RedisServer;
use product_cache::config::CacheSettings;
use product_cache::read::{CacheStatus, Lookup};
use tokio::sync::watch;

use super::actors::{Phase, Shared};
use super::config::{Config, DataLoss};
use super::history::{ms, Tally};
use super::system::Sut;
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
}

/// What happens at a point of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    DataLoss,
    FlipInvalidator,
    FlipReaders,
    Herd(usize),
}

/// The percent of the run's operations a fraction of them stands for, within the run.
fn percent(fraction: f64) -> u64 {
    (fraction * 100.0).round().clamp(1.0, 99.0) as u64
}

/// Herds spread over 10% to 90% of the run, the data loss at 45%, the flips where the config
/// puts them; an event due after the writers stopped is skipped. A restart needs `redis` here:
/// a restarted redis-server is tied to the thread that spawns it.
pub async fn inject(
    cfg: &Config,
    sut: &Sut,
    herd_settings: &CacheSettings,
    redis: &mut RedisServer,
    shared: &Shared,
    mut progress: watch::Receiver<u64>,
) -> Chaos {
    let clock = shared.clock;
    let mut schedule: Vec<(u64, Event)> = (0..cfg.herds)
        .map(|h| (10 + 80 * h as u64 / cfg.herds.max(1) as u64, Event::Herd(h)))
        .collect();
    schedule.push((45, Event::DataLoss));
    if let Some(at) = cfg.flip_version_attribute {
        schedule.push((percent(at.invalidator), Event::FlipInvalidator));
        schedule.push((percent(at.readers), Event::FlipReaders));
    }
    schedule.sort();
    let flipped_to = &sut.flipped.version_attribute;
    let mut faults = Tally::default();
    let mut herd_violations = Vec::new();
    let mut events = Vec::new();
    for (pct, what) in schedule {
        progress.wait_for(|p| *p >= pct).await.unwrap();
        if *shared.phase.borrow() != Phase::Running {
            faults.add("chaos events skipped (run over)", 1);
            continue;
        }
        match what {
            Event::DataLoss => {
                let event = lose_data(cfg.data_loss, sut, redis, shared).await;
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
            Event::Herd(h) => {
                events.push(format!("herd on cold-{h} at {:.1} ms", ms(clock.now())));
                let outcome = herd(sut, herd_settings, &format!("cold-{h}"), cfg.herd_size).await;
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
    }
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
async fn lose_data(loss: DataLoss, sut: &Sut, redis: &mut RedisServer, shared: &Shared) -> String {
    let clock = shared.clock;
    match loss {
        DataLoss::Restart => {
            shared.generation.begun.fetch_add(1, Ordering::SeqCst);
            redis.restart().await.expect("redis-server restarts");
            shared.generation.done.fetch_add(1, Ordering::SeqCst);
            format!("redis restarted at {:.1} ms", ms(clock.now()))
        }
        DataLoss::Flushall => {
            let mut conn = sut.redis_connection().await;
            let before = uptime(&mut conn).await;
            shared.generation.begun.fetch_add(1, Ordering::SeqCst);
            redis::cmd("FLUSHALL")
                .query_async::<()>(&mut conn)
                .await
                .expect("FLUSHALL");
            shared.generation.done.fetch_add(1, Ordering::SeqCst);
            let at = ms(clock.now());
            let after = uptime(&mut conn).await;
            assert!(after >= before, "redis restarted during FLUSHALL");
            format!("redis FLUSHALL at {at:.1} ms (no restart: uptime {after} s)")
        }
    }
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
async fn herd(sut: &Sut, settings: &CacheSettings, id: &str, n: usize) -> Option<String> {
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
