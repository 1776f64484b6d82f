//! Replicas confirming a batch: each pipeline to a primary ends with `INFO replication` and a
//! `WAIT` for the replicas attached to it (up to `REDIS_CONFIRM_REPLICAS`), on the same
//! connection, so a shard short of replicas after a failover never stalls the stream, while an
//! attached replica that does not acknowledge in time fails the batch.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::Ctx;
use crate::cache::node::call::Reply;
use crate::cache::node::slot_map::parse_replication;
use crate::cache::node::Addr;
use crate::cache::{CacheError, Confirm, UnderReplicated};

/// How late a server may end a `WAIT` past its timeout: blocked clients' timeouts are checked
/// on the server's timer, every 100 ms at the default `hz` of 10.
pub(crate) const WAIT_TICK: Duration = Duration::from_millis(100);

/// The confirmation a batch's pipelines end with, and how many replicas each node had attached
/// at its last batch: the next `WAIT` asks for no more, so a shard short of replicas does not
/// cost every batch the confirmation timeout.
#[derive(Default)]
pub(crate) struct Confirmer {
    confirm: Option<Confirm>,
    attached: Mutex<HashMap<Addr, u32>>,
}

impl Confirmer {
    pub fn new(confirm: Option<Confirm>) -> Self {
        Self {
            confirm,
            attached: Mutex::default(),
        }
    }

    /// How long confirming may add to a batch: up to two `WAIT`s (a second when a replica came
    /// back), each of which a server may end up to one of its timer ticks late.
    pub fn budget(&self) -> Duration {
        self.confirm
            .map_or(Duration::ZERO, |c| 2 * (c.timeout + WAIT_TICK))
    }

    /// How many replicas the `WAIT` of a pipeline to `node` asks for: the configured number,
    /// or fewer when the node had fewer attached at its last batch; every configured one for a
    /// `fenced` pipeline (its node's breaker trial). `None` when nothing is confirmed.
    pub fn to_ask(&self, node: &Addr, fenced: bool) -> Option<u32> {
        let confirm = self.confirm?;
        if fenced {
            return Some(confirm.replicas);
        }
        // A node not seen yet (a cold start, or the replica a failover just promoted, which has
        // none) is asked for none: `WAIT 0` answers at once, and its `INFO replication` says
        // how many to wait for, in a second `WAIT` (see `confirmed`). Asking for the configured
        // number instead would cost the first batch to a promoted replica the whole
        // confirmation timeout, and the benchmark's game day saw that at its p99.
        let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        Some(attached.get(node).map_or(0, |&n| n.min(confirm.replicas)))
    }

    /// Ends a pipeline with `INFO replication` (which replicas are attached now, after its
    /// writes) and `WAIT` for `asked` of them, on the same connection, since `WAIT` waits for
    /// that connection's writes and no other's.
    pub fn ask(&self, pipe: &mut redis::Pipeline, asked: Option<u32>) {
        if let (Some(confirm), Some(asked)) = (self.confirm, asked) {
            pipe.cmd("INFO").arg("replication");
            pipe.cmd("WAIT")
                .arg(asked)
                .arg(confirm.timeout.as_millis() as u64);
        }
    }

    /// Whether the `INFO replication` and `WAIT` ending a pipeline's replies (when replicas
    /// must confirm) say its writes are held by every replica attached to `node`, up to the
    /// configured number: a replica still syncing (or not there at all, the shard after a
    /// failover) cannot acknowledge and must not stall the stream, while one attached that does
    /// not acknowledge in time (stalled, cut off) fails the batch. A `WAIT` that asked for fewer
    /// than are attached now (a replica came back) goes once more, on the same connection.
    /// `Some` when fewer than configured were attached. A `fenced` pipeline needs every replica
    /// configured.
    pub async fn confirmed(
        &self,
        ctx: &Ctx,
        asked: Option<u32>,
        fenced: bool,
        reply: &Reply,
    ) -> Result<Option<UnderReplicated>, CacheError> {
        let (Some(confirm), Some(asked)) = (self.confirm, asked) else {
            return Ok(None);
        };
        let [.., info, wait] = reply.replies.as_slice() else {
            return Err(CacheError::Unexpected("no INFO and WAIT replies".into()));
        };
        // The node the pipeline reached (after a `MOVED`, not the one it was sent to).
        let node = &reply.node;
        let online = parse_replication(info.as_ref().map_err(Clone::clone)?)?.online();
        self.attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.clone(), online);
        let required = if fenced {
            confirm.replicas
        } else {
            confirm.replicas.min(online)
        };
        let mut acked = wait_reply(wait)?;
        if acked < i64::from(required) && asked < required {
            let mut pipe = redis::pipe();
            pipe.cmd("WAIT")
                .arg(required)
                .arg(confirm.timeout.as_millis() as u64);
            let budget = confirm.timeout + WAIT_TICK + ctx.timeout;
            let replies = ctx.caller.follow_up(node, reply, &pipe, budget).await?;
            acked = wait_reply(replies.last().unwrap_or(&Ok(redis::Value::Nil)))?;
        }
        if acked < i64::from(required) {
            return Err(CacheError::Unconfirmed {
                acked,
                wanted: required,
                within: confirm.timeout,
            });
        }
        Ok((required < confirm.replicas).then(|| UnderReplicated {
            node: node.to_string(),
            online,
            wanted: confirm.replicas,
        }))
    }
}

fn wait_reply(reply: &redis::RedisResult<redis::Value>) -> Result<i64, CacheError> {
    match reply {
        Ok(redis::Value::Int(n)) => Ok(*n),
        Ok(other) => Err(CacheError::Unexpected(format!("WAIT replied {other:?}"))),
        Err(e) => Err(e.clone().into()),
    }
}
