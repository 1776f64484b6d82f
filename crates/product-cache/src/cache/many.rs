//! Batch reads (`GET /products?ids=...`): many keys' values, then many keys' leases, with the
//! keys grouped by node so that each node's part goes through that node's breaker and a failing
//! node fails its own keys only. The groups are in flight together.
//!
//! A group's hits are one `MGET`. On a cluster its keys lie in many hash slots (50 products
//! fall into about 50 of the 16,384), and a multi-key command across slots is refused
//! (`CROSSSLOT`), so the cluster client splits it into one `MGET` per slot, sends them to the
//! slot's node together (to a replica with `REDIS_READ_FROM_REPLICAS`) and puts the answers back
//! in order: what a pipeline per node would cost, and redirections during a failover handled
//! as for any command. The misses' leases are the probe script per key, in flight together on
//! the multiplexed connection: one round trip per node.

use std::time::Duration;

use futures::future::{join_all, try_join_all};

use super::redis::{flag, RedisCache};
use super::scripts::scripts;
use super::topology::is_dead_connection;
use super::{lease_key, CacheError, Probe, LEASE_KEY_TTL};

impl RedisCache {
    /// The keys' indexes grouped by the name of their node's breaker, in order of first
    /// appearance.
    fn by_node(&self, keys: &[String]) -> Vec<(String, Vec<usize>)> {
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let node = self.node_of(key);
            match groups.iter_mut().find(|(n, _)| *n == node) {
                Some((_, group)) => group.push(i),
                None => groups.push((node, vec![i])),
            }
        }
        groups
    }

    /// Runs `call` for each node's group of keys, through the node's breaker, and spreads each
    /// group's outcome over its keys. `fence` turns a breaker trial's answer for one key into
    /// what the caller may serve (see fencing in `nodes.rs`).
    async fn per_node<T, F, Fut>(
        &self,
        keys: &[String],
        call: F,
        fence: impl Fn(T, &str) -> Result<T, CacheError>,
    ) -> Vec<Result<T, CacheError>>
    where
        F: Fn(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<T>, CacheError>>,
    {
        let groups = self.by_node(keys);
        let outcomes = join_all(groups.iter().map(|(node, group)| {
            let call = call(group.iter().map(|&i| keys[i].clone()).collect());
            let fence = &fence;
            async move {
                let (outcome, trial) = self.guarded_trial(&keys[group[0]], call).await;
                match outcome {
                    Ok(values) if values.len() != group.len() => Err(CacheError::Unexpected(
                        format!("{} answers for {} keys", values.len(), group.len()),
                    )),
                    Ok(values) if trial => Ok(values
                        .into_iter()
                        .map(|v| fence(v, node))
                        .collect::<Vec<_>>()),
                    Ok(values) => Ok(values.into_iter().map(Ok).collect()),
                    Err(e) => Err(e),
                }
            }
        }))
        .await;
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
        let mget = |group: Vec<String>| async move {
            let conn = self.conn().await?;
            let mut cmd = redis::cmd("MGET");
            cmd.arg(group);
            let get = |mut conn| {
                let cmd = &cmd;
                async move { cmd.query_async::<Vec<Option<String>>>(&mut conn).await }
            };
            // Once more on a dead connection (a thawed environment), as a single read does.
            match self.bounded(self.timeout, get(conn.clone())).await {
                Err(CacheError::Redis(e)) if is_dead_connection(&e) => {
                    self.bounded(self.timeout, get(conn)).await
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
        let probe = |group: Vec<String>| async move {
            let conn = self.conn().await?;
            let scripts = group.into_iter().map(|key| {
                let mut conn = conn.clone();
                async move {
                    let mut invocation = scripts().probe.key(&key);
                    invocation
                        .key(lease_key(&key))
                        .arg(token)
                        .arg(lease.as_millis().max(1) as u64)
                        .arg(flag(self.guards.leases))
                        .arg(LEASE_KEY_TTL.as_secs());
                    let (tag, value): (u8, Option<String>) =
                        invocation.invoke_async(&mut conn).await?;
                    probe_of(tag, value)
                }
            });
            self.bounded(self.timeout, async {
                Ok::<_, redis::RedisError>(try_join_all(scripts).await)
            })
            .await?
        };
        let fence = |probe: Probe, node: &str| match probe {
            Probe::Hit(_) => Err(CacheError::BreakerOpen(node.to_owned())),
            other => Ok(other),
        };
        self.per_node(keys, probe, fence).await
    }
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
