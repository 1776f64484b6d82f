//! The invalidator's batches: ops grouped by node (one pipeline per primary on a cluster, so
//! that its `WAIT` follows its writes), through each node's breaker, the apply script per hash
//! slot, or a single node's deletes without it (`deletes.rs`), in flight together within one
//! budget, and what failed reported exactly.

use std::time::Duration;

use futures::StreamExt as _;

use super::confirm::WAIT_TICK;
use super::deletes;
use super::redis::{flag, secs, RedisCache};
use super::scripts::scripts;
use super::slots::slot_of;
use super::topology::{is_dead_connection, send_idempotent, to_node, Conn};
use super::VERSION_TTL;
use super::{
    epoch_key, lease_key, staged_key, version_key, Applied, BatchError, CacheError, CacheOp,
    OpKind, Order, UnderReplicated,
};

/// Ops per pipeline on a single node: bounds one request's size, and what a failure of it
/// leaves unknown.
pub(super) const CHUNK: usize = 1000;

/// How many groups of a batch are in flight at once.
pub(super) const IN_FLIGHT: usize = 64;

/// The ops one pipeline carries: the node it goes to (on a cluster), and its ops by slot.
pub(super) struct Group {
    node: Option<(String, u16)>,
    slots: Vec<Vec<usize>>,
    /// Its node's breaker trial: confirmed by every replica configured, or not at all (see
    /// fencing in `nodes.rs`).
    fenced: bool,
}

impl Group {
    fn ops(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots.iter().flatten().copied()
    }
}

impl RedisCache {
    /// One call of the apply script for `ops[group]` (see `apply.lua` for the layout), with
    /// the `SET`s staging its new documents first (`batch` names the staged keys).
    fn apply_invocation<'a>(
        &self,
        pipe: &mut redis::Pipeline,
        script: &'a redis::Script,
        ops: &[CacheOp],
        group: &[usize],
        now_ms: u64,
        batch: &str,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation
            .arg(flag(self.guards.ordering))
            .arg(now_ms)
            .arg(VERSION_TTL.as_secs())
            .arg(flag(self.guards.evictions));
        for op in group.iter().map(|&i| &ops[i]) {
            let (kind, ttl) = match &op.kind {
                OpKind::Delete => ("del", Duration::ZERO),
                OpKind::Set { ttl, .. } => ("set", *ttl),
            };
            invocation
                .key(&op.key)
                .key(lease_key(&op.key))
                .key(version_key(&op.key))
                .key(epoch_key(&op.key))
                .arg(kind)
                .arg(secs(ttl))
                .arg(op.order.as_ref().map(Order::encode).unwrap_or_default())
                .arg(op.created_ms.map(|c| c.to_string()).unwrap_or_default())
                .arg(flag(op.delete_if_refused));
        }
        for op in group.iter().map(|&i| &ops[i]) {
            if let OpKind::Set { value, ttl } = &op.kind {
                let staged = staged_key(&op.key, batch);
                // Its TTL is the document's: RENAME carries it over, and a document whose
                // script never ran (the pipeline was cut) does not outlive it.
                pipe.cmd("SET")
                    .arg(&staged)
                    .arg(value)
                    .arg("EX")
                    .arg(secs(*ttl));
                invocation.key(staged);
            }
        }
        invocation
    }

    /// One pipeline to one node: a script call per hash slot of `group` (a script's keys must
    /// share a slot), each after the `SET`s that stage its new documents, then, when replicas
    /// must confirm, `WAIT` on the same connection, since it waits for that connection's writes
    /// and no other's. Sent optimistically as EVALSHAs; a node that does not know the script
    /// (restarted, failed over, new) answers NOSCRIPT, and the pipeline goes again with the
    /// script loaded first. Every op is idempotent, so repeating the ones that did land changes
    /// nothing.
    async fn apply_group(
        &self,
        conn: Conn,
        ops: &[CacheOp],
        group: &Group,
        now_ms: u64,
        batch: &str,
    ) -> Result<(Vec<usize>, Option<UnderReplicated>), CacheError> {
        let script = &scripts().apply;
        let asked = self.to_ask(&group.node, group.fenced);
        let pipeline = |load: bool| {
            let mut pipe = redis::pipe();
            if load {
                pipe.load_script(script);
            }
            for slot in &group.slots {
                let invocation = self.apply_invocation(&mut pipe, script, ops, slot, now_ms, batch);
                pipe.invoke_script(&invocation);
            }
            self.ask_confirmation(&mut pipe, asked);
            pipe
        };
        let send = |pipe: redis::Pipeline| {
            let mut conn = conn.clone();
            let node = group.node.clone();
            async move {
                to_node(&mut conn, pipe, node)
                    .await?
                    .into_iter()
                    .map(redis::Value::extract_error)
                    .collect::<redis::RedisResult<Vec<_>>>()
            }
        };
        let replies = match send(pipeline(false)).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                send(pipeline(true)).await
            }
            // The connection was dead (the server restarted or closed it while this process
            // was idle or frozen); the client has reconnected meanwhile. Once more, loaded,
            // since a restarted server has no scripts either.
            Err(e) if is_dead_connection(&e) => send(pipeline(true)).await,
            other => other,
        }?;
        let short = self
            .confirmed(
                &mut conn.clone(),
                &group.node,
                asked,
                group.fenced,
                &replies,
            )
            .await?;
        drop(conn);
        // The script calls' replies are the arrays (the staging SETs, SCRIPT LOAD and WAIT
        // answer otherwise), one per slot in order: the refused changes' indexes in it.
        let mut refused = Vec::new();
        let calls = replies.iter().filter_map(|r| match r {
            redis::Value::Array(items) => Some(items),
            _ => None,
        });
        for (slot, items) in group.slots.iter().zip(calls) {
            for item in items {
                match item {
                    redis::Value::Int(j) => refused.extend(slot.get(*j as usize).copied()),
                    other => {
                        return Err(CacheError::Unexpected(format!(
                            "the apply script replied {other:?}"
                        )))
                    }
                }
            }
        }
        Ok((refused, short))
    }

    /// A single node's batch of deletes, without the script (see `deletes.rs` for why that is
    /// as safe): every group's positions read, then every group's deletes and newer positions
    /// written, the second pipelines ending with `WAIT` when replicas must confirm. All first
    /// pipelines go out together and all second ones once every first has its reply: two
    /// round trips for the batch, where a group going on by itself as its reply arrived would
    /// start a round trip of its own. One outcome per group, each bounded by `deadline`.
    async fn apply_deletes(
        &self,
        conn: &Conn,
        ops: &[CacheOp],
        groups: &[Group],
        deadline: tokio::time::Instant,
        budget: Duration,
    ) -> Vec<Result<(Vec<usize>, Option<UnderReplicated>), CacheError>> {
        let bounded = |fut| async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(r) => r,
                Err(_) => Err(CacheError::Timeout(budget)),
            }
        };
        let reads = futures::future::join_all(groups.iter().map(|group| {
            let mut conn = conn.clone();
            bounded(async move {
                let (mget, read) =
                    deletes::read_positions(ops, &group.slots[0], self.guards.ordering);
                let Some(mget) = mget else {
                    return Ok((read, Vec::new()));
                };
                let mut pipe = redis::pipe();
                pipe.add_command(mget);
                let mut replies = send_idempotent(&mut conn, &pipe).await?;
                let reply = replies.pop().ok_or_else(|| {
                    CacheError::Unexpected("no reply to the MGET of positions".into())
                })?;
                let positions = redis::from_redis_value(reply)
                    .map_err(|e| CacheError::Unexpected(format!("MGET of positions: {e}")))?;
                Ok((read, positions))
            })
        }))
        .await;
        futures::future::join_all(groups.iter().zip(reads).map(|(group, read)| {
            let mut conn = conn.clone();
            async move {
                let (read, positions) = read?;
                let (mut pipe, refused) = deletes::write(ops, &group.slots[0], &read, positions);
                let asked = self.to_ask(&None, group.fenced);
                self.ask_confirmation(&mut pipe, asked);
                if pipe.is_empty() {
                    return Ok((refused, None));
                }
                let confirmed = async {
                    let replies = send_idempotent(&mut conn, &pipe).await?;
                    self.confirmed(&mut conn, &None, asked, group.fenced, &replies)
                        .await
                };
                let short = tokio::time::timeout_at(deadline, confirmed)
                    .await
                    .map_err(|_| CacheError::Timeout(budget))??;
                Ok((refused, short))
            }
        }))
        .await
    }

    /// The batch of [`Cache::apply_after`]: see there.
    pub(super) async fn apply_batch(
        &self,
        ops: &[CacheOp],
        ahead: usize,
    ) -> Result<Applied, BatchError> {
        if ops.is_empty() {
            return Ok(Applied::default());
        }
        let budget = self.timeout * ((ahead + ops.len()) / CHUNK + 1) as u32;
        // A batch waits for a connection still forming (a cold start) up to the connect budget:
        // failing it would only have Lambda deliver it again later. A read bypasses instead.
        let conn = self
            .connector
            .get(budget.max(self.connect_timeout))
            .await
            .map_err(|e| BatchError::all(ops.len(), e))?;
        let groups: Vec<Group> = match &conn {
            Conn::Single(_) => (0..ops.len())
                .collect::<Vec<_>>()
                .chunks(CHUNK)
                .map(|chunk| Group {
                    node: None,
                    slots: vec![chunk.to_vec()],
                    fenced: false,
                })
                .collect(),
            Conn::Cluster(cluster) => {
                // One pipeline per primary, so its `WAIT` follows its writes on one connection.
                let map = match self.batch_slot_map(&mut cluster.clone()).await {
                    Ok(map) => map,
                    Err(e) => return Err(BatchError::all(ops.len(), e)),
                };
                let mut by_slot: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
                for (i, op) in ops.iter().enumerate() {
                    by_slot.entry(slot_of(&op.key)).or_default().push(i);
                }
                let mut by_node: std::collections::BTreeMap<
                    Option<(String, u16)>,
                    Vec<Vec<usize>>,
                > = Default::default();
                for (slot, group) in by_slot {
                    let node = map
                        .iter()
                        .find(|(start, end, _)| (*start..=*end).contains(&slot))
                        .map(|(_, _, node)| node.clone());
                    by_node.entry(node).or_default().push(group);
                }
                by_node
                    .into_iter()
                    .map(|(node, slots)| Group {
                        node,
                        slots,
                        fenced: false,
                    })
                    .collect()
            }
        };
        // Each node through its breaker: the groups for a node whose breaker is open fail now,
        // unsent, and every other node's go ahead.
        let mut permits = self.batch_permits();
        let (mut groups, unsent): (Vec<Group>, Vec<Group>) = groups
            .into_iter()
            .partition(|g| permits.admit(&self.group_node(g.node.as_ref())));
        for group in &mut groups {
            group.fenced = permits.is_trial(&self.group_node(group.node.as_ref()));
        }
        // When the refused nodes' breakers admit their trials: the batch answers no sooner.
        let paced_until = self.breakers.trial_due(
            &unsent
                .iter()
                .map(|g| self.group_node(g.node.as_ref()))
                .collect::<Vec<_>>(),
        );
        let unsent = unsent.into_iter().map(|g| {
            let node = self.group_node(g.node.as_ref());
            (g, Err(CacheError::BreakerOpen(node)))
        });
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let batch = format!("{:016x}", fastrand::u64(..));
        // Up to two `WAIT`s (a second when a replica came back, see `confirmed`), each of which
        // a server may end up to one of its timer ticks (100 ms at the default `hz` 10) late.
        // A batch cut short here would never learn how many replicas its node has attached.
        let confirming = self
            .confirm
            .map_or(Duration::ZERO, |c| 2 * (c.timeout + WAIT_TICK));
        let deadline = tokio::time::Instant::now() + budget + confirming;
        // A single node's deletes go without the script (`deletes.rs`).
        let scriptless = matches!(conn, Conn::Single(_))
            && groups
                .iter()
                .all(|g| g.slots.iter().all(|s| deletes::scriptless(ops, s)));
        type Outcome = Result<(Vec<usize>, Option<UnderReplicated>), CacheError>;
        let outcomes: Vec<(Group, Outcome)> = if scriptless {
            let outcomes = self
                .apply_deletes(&conn, ops, &groups, deadline, budget + confirming)
                .await;
            groups.into_iter().zip(outcomes).collect()
        } else {
            futures::stream::iter(groups)
                .map(|group| {
                    let (conn, batch) = (conn.clone(), &batch);
                    async move {
                        let sent = self.apply_group(conn, ops, &group, now_ms, batch);
                        let outcome = match tokio::time::timeout_at(deadline, sent).await {
                            Ok(r) => r,
                            Err(_) => Err(CacheError::Timeout(budget + confirming)),
                        };
                        (group, outcome)
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await
        };
        let mut failed = Vec::new();
        let mut refused = Vec::new();
        let mut under_replicated: Vec<UnderReplicated> = Vec::new();
        let mut first_error = None;
        for (group, outcome) in outcomes.into_iter().chain(unsent) {
            permits.note(&self.group_node(group.node.as_ref()), &outcome);
            match outcome {
                Ok((r, short)) => {
                    refused.extend(r);
                    // Once per node: a single node's chunks, or a node of several pipelines.
                    if let Some(short) = short {
                        match under_replicated.iter_mut().find(|u| u.node == short.node) {
                            Some(known) => known.online = known.online.min(short.online),
                            None => under_replicated.push(short),
                        }
                    }
                }
                Err(e) => {
                    // Not applied, or applied on a primary that no replica confirmed: a
                    // failover could still lose it, so it counts as not applied and Lambda
                    // retries it.
                    failed.extend(group.ops());
                    first_error.get_or_insert(e);
                }
            }
        }
        self.finish_batch(permits);
        // Pacing. Ops refused by an open breaker fail without a call, but the batch's answer
        // waits until those breakers admit a trial: Lambda delivers a failed batch again at
        // once, and a batch that failed in microseconds would spend the mapping's
        // `MaximumRetryAttempts` (the template's 100) within a second or two of a node's stall,
        // giving its records up. Paced, each retry is a trial: 100 of them outlast a stall of
        // well over a minute.
        if let Some(until) = paced_until {
            tokio::time::sleep_until(until).await;
        }
        match first_error {
            None => {
                refused.sort_unstable();
                Ok(Applied {
                    refused,
                    under_replicated,
                })
            }
            Some(source) => {
                failed.sort_unstable();
                Err(BatchError { failed, source })
            }
        }
    }
}
