//! The invalidator's batches: ops grouped by node (one pipeline per primary, so that its `WAIT`
//! follows its writes), each node through its breaker, the apply script per hash slot (or a
//! single node's deletes without it, `deletes.rs`), in flight together within one budget, and
//! what failed reported exactly.
//!
//! A batch is grouped by the slot map kept (`node/topology.rs`), not one asked for it: a map
//! out of date sends some ops to a node that no longer serves their slots, which answers with a
//! redirection; those ops fail, the map is marked stale, and the batch answers once a new map
//! is in (at most [`REFRESH_WAIT`] later), so Lambda's retry goes by it.
//!
//! Every pipeline here is safe to send twice: staged documents are written under the batch's
//! own names, and the script's ops are ordered (a repeat is refused as not newer) or deletes.

use std::time::Duration;

use futures::StreamExt as _;

use super::confirm::Confirmer;
use super::deletes;
use super::scripts::scripts;
use super::{flag, secs, Ctx};
use crate::cache::node::call::{is_redirection, Admitted, Repeat, Request};
use crate::cache::node::topology::Role;
use crate::cache::node::Addr;
use crate::cache::slots::slot_of;
use crate::cache::{
    epoch_key, lease_key, staged_key, version_key, Applied, BatchError, CacheError, CacheOp,
    OpKind, Order, UnderReplicated,
};

/// Ops per pipeline on a single node: bounds one request's size, and what a failure of it
/// leaves unknown.
pub(crate) const CHUNK: usize = 1000;

/// How many pipelines of a batch are in flight at once.
pub(crate) const IN_FLIGHT: usize = 64;

/// Ops per call of the apply script: a call carries 7 arguments of its own (`EVALSHA`, the
/// hash, the key count and 4 of the script's) and at most 10 per op (4 keys, 5 arguments and a
/// staged document's key), and ElastiCache Serverless refuses a request of more than 3,999.
const OPS_PER_CALL: usize = (3_999 - 7) / 10;

/// How long a batch whose ops met a redirection waits for the new slot map before it answers.
const REFRESH_WAIT: Duration = Duration::from_millis(1000);

/// The ops one pipeline carries, by hash slot (a single node's chunk is one "slot").
struct Group {
    node: Addr,
    slots: Vec<Vec<usize>>,
}

impl Group {
    fn ops(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots.iter().flatten().copied()
    }
}

/// What one pipeline came to: the ops Redis refused as older, the node if it was short of
/// replicas, and whether the eviction guard was blind there.
#[derive(Default)]
struct Landed {
    refused: Vec<usize>,
    short: Option<UnderReplicated>,
    blind: bool,
}

/// Applies `ops` (see [`Cache::apply_after`](crate::cache::Cache::apply_after)).
pub(crate) async fn apply(
    ctx: &Ctx,
    confirmer: &Confirmer,
    ops: &[CacheOp],
    ahead: usize,
) -> Result<Applied, BatchError> {
    if ops.is_empty() {
        return Ok(Applied::default());
    }
    // The per-call timeout once per 1,000 ops, a budget that follows the work, covering the ops
    // ahead of these in the same batch, which the server works through first.
    let budget = ctx.timeout * ((ahead + ops.len()) / CHUNK + 1) as u32;
    // A batch waits for a connection still forming (a cold start) up to the connect budget:
    // failing it would only have Lambda deliver it again later. A read bypasses instead.
    let wait = budget.max(ctx.connect_timeout);
    let router = match ctx.caller.topology.router(Role::Primary, wait).await {
        Ok(router) => router,
        Err(e) => return Err(BatchError::all(ops.len(), e)),
    };
    let groups: Vec<Group> = if ctx.caller.topology.is_cluster() {
        // One pipeline per primary, so its `WAIT` follows its writes on one connection; a
        // script call per slot in it.
        let mut by_slot: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
        for (i, op) in ops.iter().enumerate() {
            by_slot.entry(slot_of(&op.key)).or_default().push(i);
        }
        let mut groups: Vec<Group> = Vec::new();
        for (slot, slot_ops) in by_slot {
            let node = router.node_of_slot(slot);
            let calls = slot_ops.chunks(OPS_PER_CALL).map(<[usize]>::to_vec);
            match groups.iter_mut().find(|g| g.node == node) {
                Some(group) => group.slots.extend(calls),
                None => groups.push(Group {
                    node,
                    slots: calls.collect(),
                }),
            }
        }
        groups
    } else {
        let node = router.node_of("");
        (0..ops.len())
            .collect::<Vec<_>>()
            .chunks(CHUNK)
            .map(|chunk| Group {
                node: node.clone(),
                // A single node's pipeline: a call per [`OPS_PER_CALL`] ops (the scriptless
                // deletes take the chunk whole).
                slots: chunk.chunks(OPS_PER_CALL).map(<[usize]>::to_vec).collect(),
            })
            .collect()
    };
    // Each pipeline through its node's breaker: those for a node whose breaker is open fail
    // now, unsent, and every other node's go ahead.
    let mut admitted = Vec::new();
    let mut unsent = Vec::new();
    for group in groups {
        match ctx.caller.admit(&group.node) {
            Ok(admission) => admitted.push((group, admission)),
            Err(e) => unsent.push((group, e)),
        }
    }
    // When the refused nodes' breakers admit their trials: the batch answers no sooner.
    let paced_until = ctx.caller.breakers().trial_due(
        &unsent
            .iter()
            .map(|(g, _)| g.node.clone())
            .collect::<Vec<_>>(),
    );
    // The connections first, each waited for up to the connect budget (see above); the budget
    // of the batch itself starts once they are there.
    futures::future::join_all(
        admitted
            .iter()
            .map(|(group, _)| ctx.caller.connected(&group.node, wait)),
    )
    .await;
    let confirming = confirmer.budget();
    let deadline = tokio::time::Instant::now() + budget + confirming;
    let batch = Batch {
        ctx,
        confirmer,
        ops,
        now_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        name: format!("{:016x}", fastrand::u64(..)),
        deadline,
        budget: budget + confirming,
    };
    // A single node's deletes go without the script (`deletes.rs`).
    let scriptless = !ctx.caller.topology.is_cluster()
        && admitted
            .iter()
            .all(|(g, _)| g.slots.iter().all(|s| deletes::scriptless(ops, s)));
    let outcomes: Vec<(Group, Result<Landed, CacheError>)> = if scriptless {
        batch.deletes(admitted).await
    } else {
        futures::stream::iter(admitted)
            .map(|(group, admission)| {
                let batch = &batch;
                async move {
                    let outcome = batch.scripted(&group, admission).await;
                    (group, outcome)
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await
    };

    let mut failed = Vec::new();
    let mut applied = Applied::default();
    let mut first_error = None;
    let mut redirected = false;
    for (group, outcome) in outcomes
        .into_iter()
        .chain(unsent.into_iter().map(|(g, e)| (g, Err(e))))
    {
        match outcome {
            Ok(landed) => {
                applied.refused.extend(landed.refused);
                applied.blind |= landed.blind;
                // Once per node: a single node's chunks, or a node of several pipelines.
                if let Some(short) = landed.short {
                    match applied
                        .under_replicated
                        .iter_mut()
                        .find(|u| u.node == short.node)
                    {
                        Some(known) => known.online = known.online.min(short.online),
                        None => applied.under_replicated.push(short),
                    }
                }
            }
            Err(e) => {
                // Not applied, or applied on a primary that no replica confirmed: a failover
                // could still lose it, so it counts as not applied and Lambda retries it.
                redirected |= matches!(&e, CacheError::Redis(e) if is_redirection(e));
                failed.extend(group.ops());
                first_error.get_or_insert(e);
            }
        }
    }
    // Pacing. Ops refused by an open breaker fail without a call, but the batch's answer waits
    // until those breakers admit a trial: Lambda delivers a failed batch again at once, and a
    // batch that failed in microseconds would spend the mapping's `MaximumRetryAttempts` (the
    // template's 100) within a second or two of a node's stall, giving its records up. Paced,
    // each retry is a trial: 100 of them outlast a stall of well over a minute. Ops that met a
    // redirection wait for the new map, for the same reason.
    if redirected {
        ctx.caller.topology.refreshed(REFRESH_WAIT).await;
    }
    if let Some(until) = paced_until {
        tokio::time::sleep_until(until).await;
    }
    match first_error {
        None => {
            applied.refused.sort_unstable();
            Ok(applied)
        }
        Some(source) => {
            failed.sort_unstable();
            Err(BatchError { failed, source })
        }
    }
}

/// One batch's shared state while its pipelines are out.
struct Batch<'a> {
    ctx: &'a Ctx,
    confirmer: &'a Confirmer,
    ops: &'a [CacheOp],
    now_ms: u64,
    /// Names the staged keys, unique per batch, so a batch still in flight (its invocation
    /// timed out and was retried) cannot move another batch's document.
    name: String,
    deadline: tokio::time::Instant,
    budget: Duration,
}

impl Batch<'_> {
    fn left(&self) -> Duration {
        self.deadline
            .saturating_duration_since(tokio::time::Instant::now())
    }

    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        match tokio::time::timeout_at(self.deadline, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(CacheError::Timeout(self.budget)),
        }
    }

    /// One pipeline to one node: a script call per hash slot of `group` (a script's keys must
    /// share a slot), each after the `SET`s that stage its new documents, then, when replicas
    /// must confirm, `INFO replication` and `WAIT` on the same connection. A node's breaker
    /// trial is fenced: confirmed by every replica configured, or not at all.
    async fn scripted(&self, group: &Group, admission: Admitted) -> Result<Landed, CacheError> {
        let fenced = admission.is_trial();
        let asked = self.confirmer.to_ask(&group.node, fenced);
        let script = &scripts().apply;
        let mut pipe = redis::pipe();
        for slot in &group.slots {
            let invocation = self.invocation(&mut pipe, script, slot);
            pipe.invoke_script(&invocation);
        }
        self.confirmer.ask(&mut pipe, asked);
        let request = Request {
            pipe,
            scripts: &[script],
            repeat: Repeat::Safe,
        };
        self.bounded(async {
            let reply = self
                .ctx
                .caller
                .send(admission, &request, self.left(), self.left())
                .await?;
            // The script calls' replies are `{refused, blind}` arrays (the staging SETs, INFO
            // and WAIT answer otherwise), one per slot in order.
            let mut landed = Landed::default();
            let mut calls = Vec::new();
            for reply in &reply.replies {
                match reply {
                    Err(e) => return Err(e.clone().into()),
                    Ok(redis::Value::Array(items)) => calls.push(items),
                    Ok(_) => {}
                }
            }
            if calls.len() != group.slots.len() {
                return Err(CacheError::Unexpected(format!(
                    "{} script replies for {} slots",
                    calls.len(),
                    group.slots.len()
                )));
            }
            for (slot, items) in group.slots.iter().zip(calls) {
                let (refused, blind): (Vec<usize>, u8) =
                    redis::from_redis_value(redis::Value::Array(items.clone())).map_err(|e| {
                        CacheError::Unexpected(format!("the apply script replied {items:?}: {e}"))
                    })?;
                for j in refused {
                    landed.refused.extend(slot.get(j).copied());
                }
                landed.blind |= blind == 1;
            }
            landed.short = self
                .confirmer
                .confirmed(self.ctx, asked, fenced, &reply)
                .await?;
            Ok(landed)
        })
        .await
    }

    /// One call of the apply script for `group`'s ops (see `apply.lua` for the layout), with
    /// the `SET`s staging its new documents first.
    fn invocation<'s>(
        &self,
        pipe: &mut redis::Pipeline,
        script: &'s redis::Script,
        group: &[usize],
    ) -> redis::ScriptInvocation<'s> {
        let guards = self.ctx.guards;
        let mut invocation = script.prepare_invoke();
        invocation
            .arg(flag(guards.ordering))
            .arg(self.now_ms)
            .arg(self.ctx.position_ttl())
            // On serverless positions are never evicted (no TTL), and INFO is not read.
            .arg(flag(guards.evictions && !self.ctx.serverless));
        for op in group.iter().map(|&i| &self.ops[i]) {
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
        for op in group.iter().map(|&i| &self.ops[i]) {
            if let OpKind::Set { value, ttl } = &op.kind {
                let staged = staged_key(&op.key, &self.name);
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

    /// A single node's batch of deletes, without the script (see `deletes.rs` for why that is
    /// as safe): every group's positions read, then every group's deletes and newer positions
    /// written, the second pipelines ending with `WAIT` when replicas must confirm. Each round's
    /// pipelines are all built before the first is sent, so they leave together: two round
    /// trips for the batch, where one sent while the next was still being built would have its
    /// reply back first and the next go as a round trip of its own.
    async fn deletes(
        &self,
        admitted: Vec<(Group, Admitted)>,
    ) -> Vec<(Group, Result<Landed, CacheError>)> {
        let ordering = self.ctx.guards.ordering;
        // 1. The positions of each group's ordered ops (`read`), in one MGET a group.
        let firsts: Vec<_> = admitted
            .into_iter()
            .map(|(group, admission)| {
                let all: Vec<usize> = group.ops().collect();
                let (mget, read) = deletes::read_positions(self.ops, &all, ordering);
                let request = mget.map(|mget| {
                    let mut pipe = redis::pipe();
                    pipe.add_command(mget);
                    pipe
                });
                (group, admission, read, request)
            })
            .collect();
        let reads = futures::future::join_all(firsts.into_iter().map(
            |(group, admission, read, pipe)| async move {
                let Some(pipe) = pipe else {
                    return (group, Ok((read, Vec::new(), Second::Admitted(admission))));
                };
                let fenced = admission.is_trial();
                let request = Request {
                    pipe,
                    scripts: &[],
                    repeat: Repeat::Safe,
                };
                let positions = self
                    .bounded(async {
                        let reply = self
                            .ctx
                            .caller
                            .send(admission, &request, self.left(), self.left())
                            .await?;
                        match reply.replies.into_iter().next() {
                            Some(Ok(reply)) => redis::from_redis_value(reply).map_err(|e| {
                                CacheError::Unexpected(format!("MGET of positions: {e}"))
                            }),
                            Some(Err(e)) => Err(e.into()),
                            None => Err(CacheError::Unexpected("no reply to an MGET".into())),
                        }
                    })
                    .await;
                (
                    group,
                    positions.map(|positions| (read, positions, Second::Admit { fenced })),
                )
            },
        ))
        .await;
        // 2. The deletes and the newer positions, each group's pipeline built first.
        let seconds: Vec<_> = reads
            .into_iter()
            .map(|(group, read)| {
                let second = read.and_then(|(read, positions, second)| {
                    let all: Vec<usize> = group.ops().collect();
                    let (mut pipe, refused) = deletes::write(self.ops, &all, &read, positions);
                    let (admission, fenced) = match second {
                        Second::Admitted(admission) => {
                            let fenced = admission.is_trial();
                            (admission, fenced)
                        }
                        // A trial's first round fences its second.
                        Second::Admit { fenced } => (self.ctx.caller.admit(&group.node)?, fenced),
                    };
                    let asked = self.confirmer.to_ask(&group.node, fenced);
                    self.confirmer.ask(&mut pipe, asked);
                    Ok((pipe, refused, admission, fenced, asked))
                });
                (group, second)
            })
            .collect();
        futures::future::join_all(seconds.into_iter().map(|(group, second)| async move {
            let outcome = match second {
                Err(e) => Err(e),
                Ok((pipe, refused, admission, fenced, asked)) => {
                    self.bounded(self.delete_writes(pipe, refused, admission, fenced, asked))
                        .await
                }
            };
            (group, outcome)
        }))
        .await
    }

    /// The second round of [`deletes`](Self::deletes) for one group: its pipeline sent (if it
    /// has anything to do) and confirmed.
    async fn delete_writes(
        &self,
        pipe: redis::Pipeline,
        refused: Vec<usize>,
        admission: Admitted,
        fenced: bool,
        asked: Option<u32>,
    ) -> Result<Landed, CacheError> {
        if pipe.is_empty() {
            return Ok(Landed {
                refused,
                ..Landed::default()
            });
        }
        let request = Request {
            pipe,
            scripts: &[],
            repeat: Repeat::Safe,
        };
        let reply = self
            .ctx
            .caller
            .send(admission, &request, self.left(), self.left())
            .await?;
        if let Some(Err(e)) = reply.replies.iter().find(|r| r.is_err()) {
            return Err(e.clone().into());
        }
        let short = self
            .confirmer
            .confirmed(self.ctx, asked, fenced, &reply)
            .await?;
        Ok(Landed {
            refused,
            short,
            blind: false,
        })
    }
}

/// How the second round of a single node's deletes may call its node.
enum Second {
    /// With the right the first round did not use.
    Admitted(Admitted),
    /// With a new right, fenced if the first round was the trial.
    Admit { fenced: bool },
}
