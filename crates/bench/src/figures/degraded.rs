//! A managed cluster's ordinary bad days, each against a baseline in the same run (issue 17):
//!
//! - **stall**: reads while the cache node is stalled (SIGSTOP: connections open, nothing
//!   answers) once the breaker has opened, against the same reads with Redis unreachable by
//!   configuration (a port nothing listens on: refused at once, no timeout paid). Samples
//!   alternate between the two, so the machine's drift falls on both alike.
//! - **recovery**: from the node's resumption (SIGCONT) to the first hit, polled every 5 ms.
//!
//! A single node that stalls and comes back, as a node in a long command or a non-clustered
//! cache does; `game_day.rs` has the cluster's version, where a stalled primary is failed over.
//! It runs on its own `redis-server` (behind a proxy for [`Net::Proxy`]), since stalling it would
//! disturb the other figures' server.

use std::time::{Duration, Instant};

use local_stack::services::DelayedRedis;
use product_cache::config::{CacheSettings, ReadSettings, RedisSettings};
use product_cache::read::{CacheStatus, ReadPath};

use crate::compare::{alternate, Compare, Cost, Order, Samples, ThroughProxy, PRODUCT};
use crate::env::Env;
use crate::report::{Budget, Net, Row, Unit};
use crate::stats;
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

    let (mut stalled, mut baseline) = (Vec::new(), Vec::new());
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
        let [stalled_now, baseline_now] =
            alternate(sizes.stall_reads, [1, 1], Order::Rotate, async |side, i| {
                let path = if side == PRODUCT { &read } else { &unreachable };
                let started = Instant::now();
                let (status, result) = path.get(&ids[i % ids.len()]).await;
                let took = Cost::wall(started.elapsed());
                if status != CacheStatus::Bypass || result.is_err() {
                    not_bypassed += 1;
                }
                Ok(took)
            })
            .await?;
        stalled.extend(stalled_now);
        baseline.extend(baseline_now);
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
    recoveries.sort_by(f64::total_cmp);
    let (stalled, baseline) = (Samples::from(stalled), Samples::from(baseline));
    let failure =
        (not_bypassed > 0).then(|| format!("{not_bypassed} reads were not answered by a bypass"));
    Ok(vec![
        bypass_latency(
            "degraded",
            "read latency p50, node stalled, breaker open",
            format!(
                "{rounds} stalls, {} reads each side, alternating; p99 {:.2} ms vs {:.2} ms \
                 (the breaker's one trial per open interval pays REDIS_TIMEOUT_MS {} ms); \
                 DynamoDB is moto",
                sizes.stall_reads,
                stalled.wall(0.99, Unit::Millis),
                baseline.wall(0.99, Unit::Millis),
                cache.redis_timeout.as_millis()
            ),
            failure,
        )
        .row(net, &stalled, &baseline),
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

/// Reads with the breaker open on a stalled node against the same reads with Redis unreachable
/// by configuration, at the median: the row this figure and the game day's share.
pub fn bypass_latency(
    figure: &'static str,
    what: &str,
    note: String,
    failure: Option<String>,
) -> Compare {
    Compare {
        figure,
        what: what.into(),
        baseline_label: "Redis unreachable by configuration".into(),
        budget: Budget::RatioAtMost(1.2),
        unit: Unit::Millis,
        p: 0.5,
        // The stalled node is the figure's own, its round trips not counted.
        through_proxy: ThroughProxy::WallAsNoted,
        note,
        failure,
    }
}
