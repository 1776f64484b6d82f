//! Reads: a key's value, many keys' values, the probe that takes a miss's lease (for one key and
//! for many), the fill under the lease, and handing a lease back.
//!
//! A hit is one plain `GET`, sent to a replica of the key's shard with replica reads (see
//! `node/topology.rs` for which replicas), so it costs the node what any reader's `GET` costs.
//! Only a miss runs the probe script, on the primary, which looks again and takes the lease
//! atomically, so a fill racing an invalidation is still caught.
//!
//! Many keys go to their nodes in parallel, one pipeline per node, each through that node's
//! breaker, so a failing node fails its own keys only. A single node's hits are one `MGET`. A
//! cluster's keys lie in many hash slots (50 products fall into about 50 of the 16,384), and a
//! multi-key command across slots is refused (`CROSSSLOT`), so each node gets one pipeline of
//! `GET`s: one write and one round trip per node. (An `MGET` per slot was tried: with two or
//! three keys per slot at most, its nested replies cost more to parse than the `GET`s' and saved
//! nothing.) A key whose slot has moved since the map was read answers with a redirection: that
//! key bypasses, the others are served.
//!
//! Every read is safe to send again on a dead connection. So is the probe, since the script
//! recognises a lease held under the caller's own token as the caller's. The fill is not (a
//! second run finds its lease gone and reports itself refused though it landed).

use std::time::Duration;

use futures::future::join_all;

use super::scripts::scripts;
use super::{flag, secs, Ctx};
use crate::cache::node::call::{Repeat, Reply, Request};
use crate::cache::node::topology::Role;
use crate::cache::node::Addr;
use crate::cache::{
    lease_key, version_key, CacheError, Fill, Order, Probe, LEASE_KEY_TTL, VERSION_TTL,
};

/// The value of `key`, from a reader of its shard.
pub(crate) async fn get(ctx: &Ctx, key: &str) -> Result<Option<String>, CacheError> {
    let router = ctx
        .caller
        .topology
        .router(Role::Reader, ctx.timeout)
        .await?;
    let node = router.node_of(key);
    let mut pipe = redis::pipe();
    pipe.get(key);
    let reply = read_call(ctx, &node, pipe, &[], Repeat::Safe).await?;
    let trial = reply.trial;
    let value: Option<String> = value_of(only(reply)?)?;
    fenced(value, trial, &node)
}

/// The cached value, or the lease on a miss: a `GET`, and the probe script only if it found
/// nothing.
pub(crate) async fn probe(
    ctx: &Ctx,
    key: &str,
    token: &str,
    lease: Duration,
) -> Result<Probe, CacheError> {
    if let Some(value) = get(ctx, key).await? {
        return Ok(Probe::Hit(value));
    }
    let script = &scripts().probe;
    let invocation = probe_invocation(ctx, key, token, lease);
    let reply = on_primary(ctx, key, script, &invocation, Repeat::Safe).await?;
    let (trial, node) = (reply.trial, reply.node.clone());
    match probe_of(only(reply)?)? {
        Probe::Hit(_) if trial => Err(CacheError::BreakerOpen(node.to_string())),
        probe => Ok(probe),
    }
}

/// Many keys' values: per key, in the order given, the value or `None`.
pub(crate) async fn get_many(
    ctx: &Ctx,
    keys: &[String],
) -> Vec<Result<Option<String>, CacheError>> {
    let router = match ctx.caller.topology.router(Role::Reader, ctx.timeout).await {
        Ok(router) => router,
        Err(e) => return keys.iter().map(|_| Err(e.clone())).collect(),
    };
    let single = !ctx.caller.topology.is_cluster();
    per_node(keys, router.group(keys), |node, group| async move {
        let mut pipe = redis::pipe();
        if single {
            let mut mget = redis::cmd("MGET");
            for &i in &group {
                mget.arg(&keys[i]);
            }
            pipe.add_command(mget);
        } else {
            for &i in &group {
                pipe.get(&keys[i]);
            }
        }
        let reply = read_call(ctx, &node, pipe, &[], Repeat::Safe).await?;
        let trial = reply.trial;
        let values: Vec<Result<Option<String>, CacheError>> = if single {
            let values: Vec<Option<String>> = value_of(only(reply)?)?;
            values.into_iter().map(Ok).collect()
        } else {
            reply.replies.into_iter().map(|r| value_of(r?)).collect()
        };
        Ok(values
            .into_iter()
            .map(|v| v.and_then(|v| fenced(v, trial, &node)))
            .collect())
    })
    .await
}

/// [`probe`] for many keys at once, all with one `token`: what a batch read does for the keys
/// [`get_many`] found missing. The probe script per key, a node's in one pipeline (one round
/// trip per node), without the `GET` a single probe sends first: the script looks again.
pub(crate) async fn probe_many(
    ctx: &Ctx,
    keys: &[String],
    token: &str,
    lease: Duration,
) -> Vec<Result<Probe, CacheError>> {
    let router = match ctx.caller.topology.router(Role::Primary, ctx.timeout).await {
        Ok(router) => router,
        Err(e) => return keys.iter().map(|_| Err(e.clone())).collect(),
    };
    let script = &scripts().probe;
    per_node(keys, router.group(keys), |node, group| async move {
        let mut pipe = redis::pipe();
        for &i in &group {
            pipe.invoke_script(&probe_invocation(ctx, &keys[i], token, lease));
        }
        let reply = read_call(ctx, &node, pipe, &[script], Repeat::Safe).await?;
        let trial = reply.trial;
        Ok(reply
            .replies
            .into_iter()
            .map(|r| match probe_of(r?)? {
                Probe::Hit(_) if trial => Err(CacheError::BreakerOpen(node.to_string())),
                probe => Ok(probe),
            })
            .collect())
    })
    .await
}

/// Writes the value if the lease is still held; `Ok(false)` when refused.
pub(crate) async fn fill(ctx: &Ctx, fill: &Fill) -> Result<bool, CacheError> {
    let script = &scripts().fill;
    let mut invocation = script.key(&fill.key);
    invocation
        .key(lease_key(&fill.key))
        .key(version_key(&fill.key))
        .arg(&fill.token)
        .arg(&fill.value)
        .arg(secs(fill.ttl))
        .arg(fill.order.as_ref().map(Order::encode).unwrap_or_default())
        .arg(match ctx.position_ttl() {
            0 => 0,
            _ => secs(VERSION_TTL.max(fill.ttl)),
        })
        .arg(flag(ctx.guards.leases))
        .arg(flag(ctx.guards.ordering));
    let reply = on_primary(ctx, &fill.key, script, &invocation, Repeat::Never).await?;
    let written: u8 = value_of(only(reply)?)?;
    Ok(written == 1)
}

/// Hands back a lease this reader will not fill with, if it is still this reader's.
pub(crate) async fn release(ctx: &Ctx, key: &str, token: &str) -> Result<(), CacheError> {
    let script = &scripts().release;
    let mut invocation = script.key(lease_key(key));
    invocation.arg(token);
    let reply = on_primary(ctx, key, script, &invocation, Repeat::Safe).await?;
    value_of::<u8>(only(reply)?).map(drop)
}

/// One call of `script` (its `invocation`) on the primary serving `key`.
async fn on_primary(
    ctx: &Ctx,
    key: &str,
    script: &redis::Script,
    invocation: &redis::ScriptInvocation<'_>,
    repeat: Repeat,
) -> Result<Reply, CacheError> {
    let router = ctx
        .caller
        .topology
        .router(Role::Primary, ctx.timeout)
        .await?;
    let mut pipe = redis::pipe();
    pipe.invoke_script(invocation);
    read_call(ctx, &router.node_of(key), pipe, &[script], repeat).await
}

fn probe_invocation<'a>(
    ctx: &Ctx,
    key: &str,
    token: &str,
    lease: Duration,
) -> redis::ScriptInvocation<'a> {
    let mut invocation = scripts().probe.key(key);
    invocation
        .key(lease_key(key))
        .arg(token)
        .arg(lease.as_millis().max(1) as u64)
        .arg(flag(ctx.guards.leases))
        .arg(LEASE_KEY_TTL.as_secs());
    invocation
}

/// A call on a request's path: bounded by the per-call timeout, waiting for a connection still
/// forming no longer than that.
async fn read_call(
    ctx: &Ctx,
    node: &Addr,
    pipe: redis::Pipeline,
    scripts: &[&redis::Script],
    repeat: Repeat,
) -> Result<Reply, CacheError> {
    let request = Request {
        pipe,
        scripts,
        repeat,
    };
    ctx.caller
        .call(node, &request, ctx.timeout, ctx.timeout)
        .await
}

/// The one reply of a one-command call.
fn only(reply: Reply) -> Result<redis::Value, CacheError> {
    let mut replies = reply.replies.into_iter();
    match (replies.next(), replies.next()) {
        (Some(reply), None) => Ok(reply?),
        _ => Err(CacheError::Unexpected(
            "not one reply to one command".into(),
        )),
    }
}

fn value_of<T: redis::FromRedisValue>(value: redis::Value) -> Result<T, CacheError> {
    redis::from_redis_value(value).map_err(|e| CacheError::Unexpected(e.to_string()))
}

/// A trial's hit is not served: it may be a demoted primary's old data (fencing,
/// `node/call.rs`).
fn fenced(value: Option<String>, trial: bool, node: &Addr) -> Result<Option<String>, CacheError> {
    match value {
        Some(_) if trial => Err(CacheError::BreakerOpen(node.to_string())),
        value => Ok(value),
    }
}

/// Runs `call` for each node's group of keys (their indexes in `keys`), all in flight
/// together, and spreads each group's outcome over its keys.
async fn per_node<T, F, Fut>(
    keys: &[String],
    groups: Vec<(Addr, Vec<usize>)>,
    call: F,
) -> Vec<Result<T, CacheError>>
where
    F: Fn(Addr, Vec<usize>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Result<T, CacheError>>, CacheError>>,
{
    let outcomes =
        join_all(groups.iter().map(|(node, group)| {
            let call = call(node.clone(), group.clone());
            async move {
                match call.await {
                    Ok(values) if values.len() != group.len() => Err(CacheError::Unexpected(
                        format!("{} answers for {} keys", values.len(), group.len()),
                    )),
                    other => other,
                }
            }
        }))
        .await;
    // One node with every key, in order (a single node's batch): its answers are the batch's,
    // as they are.
    if let [(_, group)] = groups.as_slice() {
        if group.iter().copied().eq(0..keys.len()) {
            let outcome = outcomes.into_iter().next().expect("one outcome per group");
            return match outcome {
                Ok(values) => values,
                Err(e) => keys.iter().map(|_| Err(e.clone())).collect(),
            };
        }
    }
    let mut answers: Vec<Option<Result<T, CacheError>>> = keys.iter().map(|_| None).collect();
    for ((_, group), outcome) in groups.iter().zip(outcomes) {
        match outcome {
            Ok(values) => {
                for (&i, value) in group.iter().zip(values) {
                    answers[i] = Some(value);
                }
            }
            Err(e) => {
                for &i in group {
                    answers[i] = Some(Err(e.clone()));
                }
            }
        }
    }
    answers
        .into_iter()
        .map(|a| a.expect("every key is in one group"))
        .collect()
}

/// The probe script's reply.
fn probe_of(reply: redis::Value) -> Result<Probe, CacheError> {
    let (tag, value): (u8, Option<String>) = redis::from_redis_value(reply)
        .map_err(|e| CacheError::Unexpected(format!("probe answered: {e}")))?;
    match (tag, value) {
        (1, Some(v)) => Ok(Probe::Hit(v)),
        (2, _) => Ok(Probe::Lease),
        (3, _) => Ok(Probe::Wait),
        other => Err(CacheError::Unexpected(format!("probe replied {other:?}"))),
    }
}
