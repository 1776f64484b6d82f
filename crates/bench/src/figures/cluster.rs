//! The hot key on a Redis Cluster: 1,000 records of one product in one batch, with a 25 ms
//! Redis timeout. Round trips are counted by the proxies in front of the nodes (zero delay for
//! the loopback run).

use std::time::{Duration, Instant};

use local_stack::services::RedisCluster;
use product_cache::config::{CacheSettings, InvalidationMode, InvalidatorSettings, RedisSettings};
use product_cache::invalidate::Invalidator;

use crate::env::Env;
use crate::records::{self, image};
use crate::report::{Budget, Net, Row, Unit};
use crate::{Error, Sizes};

const TIMEOUT: Duration = Duration::from_millis(25);

fn one_key_batch(id: &str, n: usize) -> serde_json::Value {
    let records = (0..n as u64)
        .map(|v| {
            let new = image(id, &format!("{}.99", 10 + v), v + 2, 0);
            let old = image(id, &format!("{}.99", 9 + v), v + 1, 0);
            records::record("MODIFY", id, Some(new), Some(old), "NEW_AND_OLD_IMAGES")
        })
        .collect();
    records::event(records)
}

pub async fn hot_key(
    env: &Env,
    sizes: &Sizes,
    net: Net,
    cluster: &RedisCluster,
    delay: Duration,
) -> Result<Vec<Row>, Error> {
    cluster.set_delay(match net {
        Net::Loopback => Duration::ZERO,
        Net::Proxy => delay,
    });
    let settings = InvalidatorSettings {
        redis: RedisSettings {
            cluster: true,
            ..RedisSettings::new(cluster.url())
        },
        mode: InvalidationMode::Delete,
        cache: CacheSettings {
            redis_timeout: TIMEOUT,
            ..CacheSettings::default()
        },
    };
    let inv = Invalidator::build(settings, &env.sdk).await?;
    let id = format!("hot-{}", net.label());
    // Discovers the topology and loads the script on the key's node; a first connection may
    // outlast 25 ms, so it gets a few tries.
    let mut warm = false;
    for _ in 0..5 {
        if inv
            .handle(one_key_batch(&id, 5))
            .await
            .batch_item_failures
            .is_empty()
        {
            warm = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = sizes.hot_key_records;
    let event = one_key_batch(&id, n);
    cluster.reset_counters();
    let started = Instant::now();
    let response = inv.handle(event).await;
    let wall = started.elapsed();
    let round_trips = cluster.round_trips() as f64;
    let failed = response.batch_item_failures.len();
    let failure = if failed > 0 {
        Some(format!(
            "the batch failed (retry from record {}): over REDIS_TIMEOUT_MS=25",
            response.batch_item_failures[0]
                .item_identifier
                .as_deref()
                .unwrap_or("?")
        ))
    } else if !warm {
        Some("even a 5-record warm-up batch failed at REDIS_TIMEOUT_MS=25".into())
    } else {
        None
    };
    let counted = match net {
        Net::Loopback => "counted through zero-delay proxies",
        Net::Proxy => "through the proxies",
    };
    Ok(vec![Row {
        figure: "cluster-hot-key",
        what: format!("{n} records of one key, 3-node cluster"),
        net,
        judged_on: "round trips; no failure at 25 ms",
        unit: Unit::RoundTrips,
        measured: round_trips,
        baseline: Some(1.0),
        baseline_label: "one round trip".into(),
        budget: Budget::AtMost(3.0),
        note: format!("{counted}; wall {:.1} ms", wall.as_secs_f64() * 1e3),
        failure,
    }])
}
