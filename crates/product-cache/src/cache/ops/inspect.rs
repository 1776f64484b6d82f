//! What the cache inspector and the operator commands ask of Redis, beside the functions' own
//! operations: a random sample of product keys from every primary, many keys' values (with
//! their positions), purging keys together with their leases, and declaring a Redis empty.
//!
//! None of this is on a request's path, so each call gets a budget that grows with its size
//! rather than the functions' per-call timeout. Keys go to their nodes one pipeline per node (a
//! pipeline of single-key commands may span slots), [`PER_CALL`] keys at a time.
//!
//! An operation that failed in a way that says its map may be out of date goes once more, on a
//! map fetched again ([`on_fresh_map`]): a tool that last called before a failover meets the
//! lost primary (its breaker open, or refusing connections) on its first call after it, and has
//! no redelivery to try again for it. The functions' own operations need no such rule: a read
//! bypasses, and Lambda delivers a failed batch again.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt as _;

use super::Ctx;
use crate::cache::node::call::{map_may_be_stale, Repeat, Request};
use crate::cache::node::topology::Role;
use crate::cache::node::Addr;
use crate::cache::{lease_key, slots, version_key, CacheError};

/// Keys per pipeline.
const PER_CALL: usize = 1000;
/// Pipelines in flight at once.
const IN_FLIGHT: usize = 32;
/// The most `RANDOMKEY` draws one sample spends per primary, or 64 per key wanted if more: side
/// keys, epoch keys (one per hash slot, 16,384 on a node that has seen refreshes in every slot)
/// and repeats are drawn too, and on a small catalogue they outnumber the products.
const MAX_DRAWS: usize = 50_000;

fn budget(ctx: &Ctx, commands: usize) -> Duration {
    ctx.timeout + Duration::from_micros(50 * commands as u64) + Duration::from_millis(200)
}

/// `op`, and once more on a map fetched again (within the connect timeout) if it failed in a
/// way that says the map may be out of date (see the module's doc).
async fn on_fresh_map<T, F, Fut>(ctx: &Ctx, op: F) -> Result<T, CacheError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, CacheError>>,
{
    match op().await {
        Err(e) if map_may_be_stale(&e) => {
            ctx.caller.topology.refreshed(ctx.connect_timeout).await;
            op().await
        }
        done => done,
    }
}

/// `pipe` to `node` within a budget for its size; any error reply fails it (a tool must not
/// read a refused command as "nothing there").
async fn call(
    ctx: &Ctx,
    node: &Addr,
    pipe: redis::Pipeline,
) -> Result<Vec<redis::Value>, CacheError> {
    let count = pipe.len();
    let request = Request {
        pipe,
        scripts: &[],
        repeat: Repeat::Safe,
    };
    let reply = ctx
        .caller
        .call(node, &request, ctx.connect_timeout, budget(ctx, count))
        .await?;
    reply
        .replies
        .into_iter()
        .map(|r| r.map_err(CacheError::from))
        .collect()
}

/// Up to `n` distinct product keys (`<prefix><id>`; side keys excluded), drawn at random from
/// every primary in proportion (`RANDOMKEY`, pipelined: one round trip per primary and round).
/// Draws until the sample is full, a primary is empty, or the primary's draws are spent
/// ([`MAX_DRAWS`]); fewer keys when the cache holds fewer.
pub(crate) async fn sample_keys(
    ctx: &Ctx,
    prefix: &str,
    n: usize,
) -> Result<Vec<String>, CacheError> {
    on_fresh_map(ctx, || sample_once(ctx, prefix, n)).await
}

async fn sample_once(ctx: &Ctx, prefix: &str, n: usize) -> Result<Vec<String>, CacheError> {
    let router = ctx
        .caller
        .topology
        .router(Role::Primary, ctx.connect_timeout)
        .await?;
    let primaries = router.primaries();
    let per_node = n.div_ceil(primaries.len().max(1));
    let max_draws = MAX_DRAWS.max(per_node * 64);
    let mut keys = BTreeSet::new();
    let mut draws = 0;
    for node in &primaries {
        let mut found = BTreeSet::new();
        let mut spent = 0;
        while found.len() < per_node && spent < max_draws {
            // Three draws per key still wanted, but no fewer than a quarter of a pipeline: a
            // small sample on a small catalogue would otherwise spend its draws a few at a time.
            let round = ((per_node - found.len()) * 3)
                .clamp(PER_CALL / 4, PER_CALL)
                .min(max_draws - spent);
            let mut pipe = redis::pipe();
            for _ in 0..round {
                pipe.cmd("RANDOMKEY");
            }
            spent += round;
            let mut empty = true;
            for reply in call(ctx, node, pipe).await? {
                if let Ok(Some(key)) = redis::from_redis_value::<Option<String>>(reply) {
                    empty = false;
                    if key.starts_with(prefix) && found.len() < per_node {
                        found.insert(key);
                    }
                }
            }
            if empty {
                break; // an empty node
            }
        }
        draws += spent;
        keys.extend(found);
    }
    tracing::debug!(keys = keys.len(), draws, "sampled the cache");
    Ok(keys.into_iter().take(n).collect())
}

/// Each key's replies to the `per_key` commands `build` adds for it, in key order: one
/// pipeline per node (and [`PER_CALL`] keys), in flight together.
async fn per_key(
    ctx: &Ctx,
    keys: &[String],
    per_key: usize,
    build: impl Fn(&mut redis::Pipeline, &str),
) -> Result<Vec<Vec<redis::Value>>, CacheError> {
    on_fresh_map(ctx, || per_key_once(ctx, keys, per_key, &build)).await
}

async fn per_key_once(
    ctx: &Ctx,
    keys: &[String],
    per_key: usize,
    build: &impl Fn(&mut redis::Pipeline, &str),
) -> Result<Vec<Vec<redis::Value>>, CacheError> {
    let router = ctx
        .caller
        .topology
        .router(Role::Primary, ctx.connect_timeout)
        .await?;
    let calls = router.group(keys).into_iter().flat_map(|(node, group)| {
        group
            .chunks(PER_CALL)
            .map(|chunk| (node.clone(), chunk.to_vec()))
            .collect::<Vec<_>>()
    });
    let sent = futures::stream::iter(calls.map(|(node, group)| {
        let mut pipe = redis::pipe();
        for &i in &group {
            build(&mut pipe, &keys[i]);
        }
        async move { Ok::<_, CacheError>((group, call(ctx, &node, pipe).await?)) }
    }))
    .buffer_unordered(IN_FLIGHT)
    .collect::<Vec<_>>()
    .await;
    let mut out = vec![Vec::new(); keys.len()];
    for result in sent {
        let (group, replies) = result?;
        for (&i, replies) in group.iter().zip(replies.chunks(per_key)) {
            out[i] = replies.to_vec();
        }
    }
    Ok(out)
}

/// Each key's value and recorded position (`{key}:ver`).
pub(crate) async fn values(
    ctx: &Ctx,
    keys: &[String],
) -> Result<Vec<(Option<String>, Option<String>)>, CacheError> {
    per_key(ctx, keys, 2, |pipe, key| {
        pipe.get(key).get(version_key(key));
    })
    .await?
    .into_iter()
    .map(|r| {
        redis::from_redis_value(redis::Value::Array(r))
            .map_err(|e| CacheError::Unexpected(e.to_string()))
    })
    .collect()
}

/// Waits, up to `wait`, until the slot map is known and every primary's connection is up: for
/// a one-shot tool (an operator command) whose first call would otherwise meet a connection
/// still forming (TLS, `AUTH`, the map) and bypass or fail at once, as a function's first
/// request may by design. The first primary still unreachable at the end is the error.
pub(crate) async fn ready(ctx: &Ctx, wait: Duration) -> Result<(), CacheError> {
    let deadline = tokio::time::Instant::now() + wait;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let router = ctx.caller.topology.router(Role::Primary, wait).await?;
    for node in router.primaries() {
        ctx.caller.ready(&node, left()).await?;
    }
    Ok(())
}

/// Deletes each key with its lease, the way an invalidation does: a reader that took the lease
/// before cannot fill the old value back afterwards. Its position stays, so ordering still
/// refuses older records. Returns how many of the keys held a value.
pub(crate) async fn purge(ctx: &Ctx, keys: &[String]) -> Result<usize, CacheError> {
    let replies = per_key(ctx, keys, 2, |pipe, key| {
        pipe.del(key).del(lease_key(key));
    })
    .await?;
    Ok(replies
        .iter()
        .filter(|r| matches!(r.first(), Some(redis::Value::Int(1))))
        .count())
}

/// Every slot's epoch set to 0 where none is set yet (see
/// [`RedisCache::declare_empty`](crate::cache::RedisCache::declare_empty)).
pub(crate) async fn declare_empty(ctx: &Ctx) -> Result<(), CacheError> {
    let keys: Vec<String> = (0..slots::SLOTS).map(slots::epoch_key_of_slot).collect();
    per_key(ctx, &keys, 1, |pipe, key| {
        pipe.set_options(
            key,
            "0:?",
            redis::SetOptions::default().conditional_set(redis::ExistenceCheck::NX),
        );
    })
    .await
    .map(drop)
}
