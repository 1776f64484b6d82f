//! Faults injected at points of the run's progress: one Redis restart (same port, empty) and
//! herds of concurrent reads of a cold key, each herd one check of invariant 4.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use local_stack::services::RedisServer;
use product_cache::config::CacheSettings;
use product_cache::read::{CacheStatus, Lookup};
use tokio::sync::watch;

use super::actors::{Phase, Shared};
use super::config::Config;
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

/// Herds spread over 10% to 90% of the run, the restart at 45%; an event due after the writers
/// stopped is skipped. The restart needs `redis` here: a restarted redis-server is tied to the
/// thread that spawns it.
pub async fn inject(
    cfg: &Config,
    sut: &Sut,
    herd_settings: &CacheSettings,
    redis: &mut RedisServer,
    shared: &Shared,
    mut progress: watch::Receiver<u64>,
) -> Chaos {
    let clock = shared.clock;
    let mut schedule: Vec<(u64, Option<usize>)> = (0..cfg.herds)
        .map(|h| (10 + 80 * h as u64 / cfg.herds.max(1) as u64, Some(h)))
        .collect();
    schedule.push((45, None));
    schedule.sort();
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
