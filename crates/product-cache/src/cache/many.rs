//! Batch reads (`GET /products?ids=...`): many keys' values, then many keys' leases, with the
//! keys grouped by node so that each node's part goes through that node's breaker and a failing
//! node fails its own keys only. The groups are in flight together.
//!
//! A single node's hits are one `MGET`. A cluster's keys lie in many hash slots (50 products
//! fall into about 50 of the 16,384), and a multi-key command across slots is refused
//! (`CROSSSLOT`), so each node gets one pipeline of `GET`s, routed by the slot of its first
//! key (to a replica of that shard with `REDIS_READ_FROM_REPLICAS`): one write and one round
//! trip per node. (The cluster client would split a cross-slot `MGET` itself, but into one
//! request per slot, written apart: more round trips as soon as replies come back between the
//! writes. An `MGET` per slot in the pipeline was the first form: with two or three keys per
//! slot at most, its nested replies cost more to parse than the `GET`s' and saved nothing.) A
//! key whose slot has moved since the slot map was read answers with a redirection inside the
//! pipeline: that key bypasses, the others are served. Until the slot map is known, the whole
//! cluster is one group, left to the client's routing command by command.
//!
//! The misses' leases are the probe script per key, in flight together on the multiplexed
//! connection: one round trip per node.

use std::time::Duration;

use futures::future::join_all;

use super::redis::{flag, RedisCache};
use super::scripts::scripts;
use super::slots::slot_of;
use super::topology::{is_dead_connection, Conn};
use super::{lease_key, CacheError, Probe, LEASE_KEY_TTL};

impl RedisCache {
    /// Runs `call` for each node's group of keys (their indexes in `keys`, and whether the
    /// group is the whole cluster's: see [`Self::to_keys_node`]), through the node's breaker,
    /// and spreads each group's outcome over its keys. `fence` turns a breaker trial's
    /// answer for one key into what the caller may serve (see fencing in `nodes.rs`).
    async fn per_node<T, F, Fut>(
        &self,
        keys: &[String],
        call: F,
        fence: impl Fn(T, &str) -> Result<T, CacheError>,
    ) -> Vec<Result<T, CacheError>>
    where
        F: Fn(Vec<usize>, bool) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Result<T, CacheError>>, CacheError>>,
    {
        let groups = self.group_by_node(keys);
        let outcomes = join_all(groups.iter().map(|(node, group)| {
            let call = call(group.clone(), self.is_whole_cluster(node));
            let fence = &fence;
            async move {
                let (outcome, trial) = self.guarded_trial_on(node, call).await;
                match outcome {
                    Ok(values) if values.len() != group.len() => Err(CacheError::Unexpected(
                        format!("{} answers for {} keys", values.len(), group.len()),
                    )),
                    Ok(values) if trial => Ok(values
                        .into_iter()
                        .map(|v| v.and_then(|v| fence(v, node)))
                        .collect::<Vec<_>>()),
                    Ok(values) => Ok(values),
                    Err(e) => Err(e),
                }
            }
        }))
        .await;
        // One node with every key, in order (a single node's batch): its answers are the
        // batch's, as they are.
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

    /// [`Cache::get_many`](super::Cache::get_many): one `MGET` per node.
    pub(super) async fn get_many_by_node(
        &self,
        keys: &[String],
    ) -> Vec<Result<Option<String>, CacheError>> {
        let mget = |group: Vec<usize>, whole: bool| async move {
            let conn = self.conn().await?;
            // Once more on a dead connection (a thawed environment), as a single read does.
            match self
                .bounded(self.timeout, self.mget(conn.clone(), keys, &group, whole))
                .await
            {
                Err(CacheError::Redis(e)) if is_dead_connection(&e) => {
                    self.bounded(self.timeout, self.mget(conn, keys, &group, whole))
                        .await
                }
                other => other,
            }
        };
        // A trial's hit is not served: it may be a demoted primary's old data.
        let fence = |value: Option<String>, node: &str| match value {
            Some(_) => Err(CacheError::BreakerOpen(node.to_owned())),
            None => Ok(None),
        };
        self.per_node(keys, mget, fence).await
    }

    /// [`Cache::probe_many`](super::Cache::probe_many): the probe script per key, a node's in
    /// flight together (one round trip), without the `GET` a single probe sends first: the
    /// caller's `get_many` has just found these keys missing, and the script looks again.
    pub(super) async fn probe_many_by_node(
        &self,
        keys: &[String],
        token: &str,
        lease: Duration,
    ) -> Vec<Result<Probe, CacheError>> {
        let probe = |group: Vec<usize>, whole: bool| async move {
            let conn = self.conn().await?;
            let script = &scripts().probe;
            let pipeline = |load: bool| {
                let mut pipe = redis::pipe();
                if load {
                    pipe.load_script(script);
                }
                for key in group.iter().map(|&i| &keys[i]) {
                    let mut invocation = script.key(key);
                    invocation
                        .key(lease_key(key))
                        .arg(token)
                        .arg(lease.as_millis().max(1) as u64)
                        .arg(flag(self.guards.leases))
                        .arg(LEASE_KEY_TTL.as_secs());
                    pipe.invoke_script(&invocation);
                }
                pipe
            };
            let send = |pipe| {
                self.bounded(
                    self.timeout,
                    self.to_keys_node(conn.clone(), pipe, &keys[group[0]], false, whole),
                )
            };
            // Sent as EVALSHAs; a node that does not know the script (restarted, failed over,
            // new) answers NOSCRIPT, and the pipeline goes again with the script loaded first.
            // Once more, too, on a dead connection (a thawed environment).
            let replies = match send(pipeline(false)).await {
                Ok(replies) if !replies.iter().any(is_noscript) => replies,
                Err(CacheError::Redis(e)) if !is_dead_connection(&e) => return Err(e.into()),
                Err(e @ (CacheError::Timeout(_) | CacheError::BreakerOpen(_))) => return Err(e),
                // The script's load answers first; the calls after it.
                _ => send(pipeline(true)).await?.into_iter().skip(1).collect(),
            };
            Ok(replies
                .into_iter()
                .map(|reply| {
                    let (tag, value): (u8, Option<String>) = redis::from_redis_value(reply?)
                        .map_err(|e| CacheError::Unexpected(format!("probe answered: {e}")))?;
                    probe_of(tag, value)
                })
                .collect())
        };
        let fence = |probe: Probe, node: &str| match probe {
            Probe::Hit(_) => Err(CacheError::BreakerOpen(node.to_owned())),
            other => Ok(other),
        };
        self.per_node(keys, probe, fence).await
    }
}

impl RedisCache {
    /// The values of the `group` of `keys`, all on one node: one `MGET` on a single node; on a
    /// cluster, a pipeline of `GET`s to the node serving the first key's slot (see the module's
    /// doc). A key whose `GET` was refused (a redirection) fails alone.
    async fn mget(
        &self,
        mut conn: Conn,
        keys: &[String],
        group: &[usize],
        whole: bool,
    ) -> redis::RedisResult<Vec<Result<Option<String>, CacheError>>> {
        let group_keys = group.iter().map(|&i| &keys[i]);
        if let Conn::Single(_) = conn {
            let mut mget = redis::cmd("MGET");
            for key in group_keys {
                mget.arg(key);
            }
            let values: Vec<Option<String>> = mget.query_async(&mut conn).await?;
            return Ok(values.into_iter().map(Ok).collect());
        }
        let mut pipe = redis::pipe();
        for key in group_keys {
            pipe.get(key);
        }
        let replies = self
            .to_keys_node(conn, pipe, &keys[group[0]], self.read_from_replicas, whole)
            .await?;
        if replies.len() != group.len() {
            let e = CacheError::Unexpected(format!(
                "{} GETs answered {} replies",
                group.len(),
                replies.len()
            ));
            return Ok(group.iter().map(|_| Err(e.clone())).collect());
        }
        Ok(replies
            .into_iter()
            .map(|reply| {
                redis::from_redis_value(reply?)
                    .map_err(|e| CacheError::Unexpected(format!("GET answered: {e}")))
            })
            .collect())
    }
}

impl RedisCache {
    /// Sends `pipe`, commands on keys all on one node, in one write: to the single node; on a
    /// cluster, to the node serving `first_key`'s slot (a replica of its shard when `replica`),
    /// or, for the `whole` cluster's group (the slot map not known), as separate commands the
    /// cluster client routes one by one. Error replies stay in the result.
    async fn to_keys_node(
        &self,
        mut conn: Conn,
        pipe: redis::Pipeline,
        first_key: &str,
        replica: bool,
        whole: bool,
    ) -> redis::RedisResult<Vec<redis::RedisResult<redis::Value>>> {
        use redis::aio::ConnectionLike as _;
        use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
        let count = pipe.len();
        match &mut conn {
            Conn::Cluster(c) if !whole => {
                let to = if replica {
                    SlotAddr::ReplicaOptional
                } else {
                    SlotAddr::Master
                };
                let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot_of(first_key), to));
                let replies = c.route_pipeline(pipe, 0, count, route).await?;
                Ok(replies
                    .into_iter()
                    .map(redis::Value::extract_error)
                    .collect())
            }
            Conn::Cluster(_) => {
                let sent = pipe.cmd_iter().map(|cmd| {
                    let mut conn = conn.clone();
                    async move { conn.req_packed_command(cmd).await }
                });
                Ok(join_all(sent).await)
            }
            Conn::Single(_) => {
                let replies = conn.req_packed_commands(&pipe, 0, count).await?;
                Ok(replies
                    .into_iter()
                    .map(redis::Value::extract_error)
                    .collect())
            }
        }
    }
}

/// Whether a reply is the NOSCRIPT error of a node that does not know the script.
fn is_noscript(reply: &redis::RedisResult<redis::Value>) -> bool {
    matches!(reply, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
}

/// The probe script's reply.
pub(super) fn probe_of(tag: u8, value: Option<String>) -> Result<Probe, CacheError> {
    match (tag, value) {
        (1, Some(v)) => Ok(Probe::Hit(v)),
        (2, _) => Ok(Probe::Lease),
        (3, _) => Ok(Probe::Wait),
        other => Err(CacheError::Unexpected(format!("probe replied {other:?}"))),
    }
}
