//! A managed cluster's ordinary bad days, each against a baseline in the same run (issue 17):
//!
//! - **stall**: reads while the cache node is stalled (SIGSTOP: connections open, nothing
//!   answers) once the breaker has opened, against the same reads with Redis unreachable by
//!   configuration (a port nothing listens on: refused at once, no timeout paid). Samples
//!   alternate between the two, so the machine's drift falls on both alike.
//! - **recovery**: from the node's resumption (SIGCONT) to the first hit, polled every 5 ms.
//! - **under-replicated**: the invalidator's lag, from a record's hand-over to its batch being
//!   acknowledged, with `REDIS_CONFIRM_REPLICAS=1` while the primary has its replica and again
//!   after the replica is gone (a failover's promoted replica, minutes of a node replacement).
//!   The batches are built in memory (`records.rs`): the stream's polling would add the same
//!   ~250 ms to both phases and hide the difference.
//!
//! Each runs on its own `redis-server` (behind a proxy for [`Net::Proxy`]), since stalling or
//! losing a replica would disturb the other figures' server.

use std::time::{Duration, Instant};

use local_stack::services::{DelayedRedis, RedisServer};
use product_cache::cache::RedisCache;
use product_cache::config::{
    CacheSettings, InvalidationMode, InvalidatorSettings, ReadSettings, RedisSettings,
};
use product_cache::invalidate::Invalidator;
use product_cache::read::{CacheStatus, ReadPath};

use crate::env::Env;
use crate::records;
use crate::report::{Budget, Net, Row, Unit};
use crate::stats::{self, percentile};
use crate::{Error, Sizes};

/// The stall and the recovery figures. `ids` are products of `table`.
pub async fn stall(
    env: &Env,
    sizes: &Sizes,
    net: Net,
    table: &str,
    ids: &[String],
) -> Result<Vec<Row>, Error> {
    let delay = match net {
        Net::Loopback => Duration::ZERO,
        Net::Proxy => env.delay(),
    };
    let redis = DelayedRedis::start(delay).await?;
    let url = match net {
        Net::Loopback => redis.direct_url(),
        Net::Proxy => redis.url(),
    };
    let cache = CacheSettings::default();
    let read = ReadPath::build(
        ReadSettings::new(RedisSettings::new(&url), table, cache.clone()),
        &env.sdk,
    )
    .await?;
    let closed = local_stack::services::free_port();
    let unreachable = ReadPath::build(
        ReadSettings::new(
            RedisSettings::new(format!("redis://127.0.0.1:{closed}")),
            table,
            cache.clone(),
        ),
        &env.sdk,
    )
    .await?;
    let ids = &ids[..ids.len().min(50)];
    // Cached, so that hits after the recovery tell the cache is back.
    for id in ids {
        let _ = read.get(id).await;
        let _ = unreachable.get(id).await;
    }

    let (mut stalled_ms, mut baseline_ms) = (Vec::new(), Vec::new());
    let mut recoveries = Vec::new();
    let mut not_bypassed = 0;
    let rounds = sizes.stall_rounds;
    for round in 0..rounds {
        redis.server().stall();
        // Until the breaker opens, reads pay the timeout: what the figure is not about. It has
        // opened once a read bypasses faster than half the timeout.
        let opened = Instant::now();
        loop {
            let started = Instant::now();
            let (status, _) = read.get(&ids[round % ids.len()]).await;
            if status == CacheStatus::Bypass && started.elapsed() < cache.redis_timeout / 2 {
                break;
            }
            if opened.elapsed() > Duration::from_secs(10) {
                redis.server().resume();
                return Err("the breaker never opened on a stalled node".into());
            }
        }
        for i in 0..sizes.stall_reads {
            let id = &ids[i % ids.len()];
            for turn in 0..2 {
                let (path, into) = if (turn + i) % 2 == 0 {
                    (&read, &mut stalled_ms)
                } else {
                    (&unreachable, &mut baseline_ms)
                };
                let started = Instant::now();
                let (status, result) = path.get(id).await;
                into.push(stats::millis(started.elapsed()));
                if status != CacheStatus::Bypass || result.is_err() {
                    not_bypassed += 1;
                }
            }
        }
        redis.server().resume();
        let resumed = Instant::now();
        loop {
            let (status, _) = read.get(&ids[0]).await;
            if status == CacheStatus::Hit {
                recoveries.push(stats::millis(resumed.elapsed()));
                break;
            }
            if resumed.elapsed() > Duration::from_secs(30) {
                return Err("no hit within 30 s of the node's recovery".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for v in [&mut stalled_ms, &mut baseline_ms, &mut recoveries] {
        v.sort_by(f64::total_cmp);
    }
    let failure =
        (not_bypassed > 0).then(|| format!("{not_bypassed} reads were not answered by a bypass"));
    Ok(vec![
        Row {
            figure: "degraded",
            what: "read latency p50, node stalled, breaker open".into(),
            net,
            judged_on: "wall",
            unit: Unit::Millis,
            measured: percentile(&stalled_ms, 0.5),
            baseline: Some(percentile(&baseline_ms, 0.5)),
            baseline_label: "Redis unreachable by configuration".into(),
            budget: Budget::RatioAtMost(1.2),
            note: format!(
                "{rounds} stalls, {} reads each side, alternating; p99 {:.2} ms vs {:.2} ms \
                 (the breaker's one trial per open interval pays REDIS_TIMEOUT_MS {} ms); \
                 DynamoDB is moto",
                sizes.stall_reads,
                percentile(&stalled_ms, 0.99),
                percentile(&baseline_ms, 0.99),
                cache.redis_timeout.as_millis()
            ),
            failure,
        },
        Row {
            figure: "degraded",
            what: "node recovered to hits again, max".into(),
            net,
            judged_on: "wall, polled every 5 ms",
            unit: Unit::Millis,
            measured: recoveries.last().copied().unwrap_or(f64::NAN),
            baseline: None,
            baseline_label: String::new(),
            budget: Budget::AtMost(2000.0),
            note: format!(
                "{} recoveries: median {:.0} ms",
                recoveries.len(),
                stats::median(&recoveries)
            ),
            failure: None,
        },
    ])
}

/// The invalidation lag with the primary's replica there, and after it is gone.
pub async fn under_replicated(env: &Env, sizes: &Sizes, net: Net) -> Result<Vec<Row>, Error> {
    let delay = match net {
        Net::Loopback => Duration::ZERO,
        Net::Proxy => env.delay(),
    };
    // A replica's first sync waits 5 s by default, for more replicas to share it.
    let primary = DelayedRedis::start_with(delay, &["--repl-diskless-sync-delay", "0"]).await?;
    let port = primary.server().port().to_string();
    let mut replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]).await?;
    wait_replicas(&primary.direct_url(), 1).await?;
    let url = match net {
        Net::Loopback => primary.direct_url(),
        Net::Proxy => primary.url(),
    };
    let settings = InvalidatorSettings {
        redis: RedisSettings {
            confirm_replicas: 1,
            ..RedisSettings::new(&url)
        },
        mode: InvalidationMode::Refresh,
        cache: CacheSettings::default(),
    };
    let invalidator = Invalidator::build(settings, &env.sdk).await?;
    // Warm: connection, scripts.
    invalidator.handle(lag_batch(sizes, 0)).await;
    let (healthy, failed_healthy) = lag_phase(&invalidator, sizes, 1).await;
    replica.stop().await;
    wait_replicas(&primary.direct_url(), 0).await?;
    let (short, failed_short) = lag_phase(&invalidator, sizes, 1 + sizes.lag_batches).await;
    let p99 = (percentile(&short, 0.99), percentile(&healthy, 0.99));
    let failed = failed_healthy + failed_short;
    Ok(vec![Row {
        figure: "degraded",
        what: "invalidation lag p99, shard short of its replica".into(),
        net,
        judged_on: "wall",
        unit: Unit::Millis,
        measured: p99.0,
        baseline: Some(p99.1),
        baseline_label: "the same with the replica there".into(),
        budget: Budget::RatioAtMost(1.5),
        note: format!(
            "REDIS_CONFIRM_REPLICAS=1; {} batches of {} records each phase; p50 {:.2} ms vs \
             {:.2} ms; record handed over to batch acknowledged",
            sizes.lag_batches,
            sizes.lag_batch,
            percentile(&short, 0.5),
            percentile(&healthy, 0.5)
        ),
        failure: (failed > 0).then(|| {
            format!("{failed_healthy} healthy and {failed_short} under-replicated batches failed")
        }),
    }])
}

/// Batch `n`: `sizes.lag_batch` refreshes of ~0.5 KB documents over 2,000 keys.
fn lag_batch(sizes: &Sizes, n: usize) -> serde_json::Value {
    let records = (0..sizes.lag_batch)
        .map(|k| {
            let id = format!("lag-{:04}", (n * sizes.lag_batch + k) % 2000);
            let image = records::image(&id, "10.00", n as u64, 200);
            records::record("MODIFY", &id, Some(image), None, "NEW_AND_OLD_IMAGES")
        })
        .collect();
    records::event(records)
}

/// `sizes.lag_batches` batches from batch `first` on, one at a time: each one's lag, sorted,
/// and how many failed.
async fn lag_phase(
    invalidator: &Invalidator<RedisCache>,
    sizes: &Sizes,
    first: usize,
) -> (Vec<f64>, usize) {
    let mut lags = Vec::with_capacity(sizes.lag_batches);
    let mut failed = 0;
    for n in first..first + sizes.lag_batches {
        let event = lag_batch(sizes, n);
        let started = Instant::now();
        let response = invalidator.handle(event).await;
        lags.push(stats::millis(started.elapsed()));
        failed += usize::from(!response.batch_item_failures.is_empty());
    }
    lags.sort_by(f64::total_cmp);
    (lags, failed)
}

/// Waits (up to 20 s) until the primary at `url` reports exactly `n` replicas online.
async fn wait_replicas(url: &str, n: usize) -> Result<(), Error> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let started = Instant::now();
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await?;
        let online = info
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count();
        if online == n && info.contains(&format!("connected_slaves:{n}")) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(20) {
            return Err(format!("the primary never had {n} replicas online: {info}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
