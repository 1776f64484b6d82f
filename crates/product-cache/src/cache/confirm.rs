//! Replicas confirming a batch: each pipeline to a primary ends with `INFO replication` and a
//! `WAIT` for the replicas attached to it (up to `REDIS_CONFIRM_REPLICAS`), on the same
//! connection, so a shard short of replicas after a failover never stalls the stream, while an
//! attached replica that does not acknowledge in time fails the batch.

use std::time::Duration;

use super::redis::RedisCache;
use super::topology::{to_node, Conn, Node};
use super::{CacheError, UnderReplicated};

/// How late a server may end a `WAIT` past its timeout: blocked clients' timeouts are checked
/// on the server's timer, every 100 ms at the default `hz` of 10.
pub(super) const WAIT_TICK: Duration = Duration::from_millis(100);

impl RedisCache {
    /// How many replicas the `WAIT` of a pipeline to `node` asks for: the configured number,
    /// or fewer when the node had fewer attached at its last batch. `None` when nothing is
    /// confirmed.
    pub(super) fn to_ask(&self, node: &Node, fenced: bool) -> Option<u32> {
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
    pub(super) fn ask_confirmation(&self, pipe: &mut redis::Pipeline, asked: Option<u32>) {
        if let (Some(confirm), Some(asked)) = (self.confirm, asked) {
            pipe.cmd("INFO").arg("replication");
            pipe.cmd("WAIT")
                .arg(asked)
                .arg(confirm.timeout.as_millis() as u64);
        }
    }

    /// Whether the `INFO replication` and `WAIT` ending a pipeline's `replies` (when replicas
    /// must confirm) say its writes are held by every replica attached to `node`, up to the
    /// configured number: a replica still syncing (or not there at all, the shard after a
    /// failover) cannot acknowledge and must not stall the stream, while one attached that does
    /// not acknowledge in time (stalled, cut off) fails the batch. A `WAIT` that asked for fewer
    /// than are attached now (a replica came back) goes once more, on the same connection.
    /// `Some` when fewer than configured were attached. A `fenced` pipeline (its node's breaker
    /// trial) needs every replica configured.
    pub(super) async fn confirmed(
        &self,
        conn: &mut Conn,
        node: &Node,
        asked: Option<u32>,
        fenced: bool,
        replies: &[redis::Value],
    ) -> Result<Option<UnderReplicated>, CacheError> {
        let (Some(confirm), Some(asked)) = (self.confirm, asked) else {
            return Ok(None);
        };
        let [.., info, wait] = replies else {
            return Err(CacheError::Unexpected(format!(
                "no INFO and WAIT replies in {replies:?}"
            )));
        };
        let online = online_replicas(info)?;
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
            let replies = to_node(conn, pipe, node.clone()).await?;
            acked = wait_reply(replies.last().unwrap_or(&redis::Value::Nil))?;
        }
        if acked < i64::from(required) {
            return Err(CacheError::Unconfirmed {
                acked,
                wanted: required,
                within: confirm.timeout,
            });
        }
        Ok((required < confirm.replicas).then(|| UnderReplicated {
            node: self.group_node(node.as_ref()),
            online,
            wanted: confirm.replicas,
        }))
    }
}

/// The replicas `INFO replication` lists as `state=online`: attached and streaming, so able to
/// acknowledge a `WAIT`. One still loading its full sync (`wait_bgsave`, `send_bulk`) cannot.
fn online_replicas(info: &redis::Value) -> Result<u32, CacheError> {
    let text: String = redis::from_redis_value(info.clone())
        .map_err(|e| CacheError::Unexpected(format!("INFO replication: {e}")))?;
    Ok(text
        .lines()
        .filter(|line| {
            line.strip_prefix("slave")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
                && line.split([':', ',']).any(|field| field == "state=online")
        })
        .count() as u32)
}

fn wait_reply(reply: &redis::Value) -> Result<i64, CacheError> {
    match reply {
        redis::Value::Int(n) => Ok(*n),
        other => Err(CacheError::Unexpected(format!("WAIT replied {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use redis::Value;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn only_online_replicas_count() {
        let info = bulk(
            "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
             slave0:ip=10.0.0.2,port=6379,state=online,offset=100,lag=0\r\n\
             slave1:ip=10.0.0.3,port=6379,state=wait_bgsave,offset=0,lag=0\r\n\
             slave2:ip=10.0.0.4,port=6379,state=online,offset=90,lag=1\r\n\
             master_failover_state:no-failover\r\nslave_read_only:1\r\n",
        );
        assert_eq!(super::online_replicas(&info).unwrap(), 2);
        let none = bulk("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n");
        assert_eq!(super::online_replicas(&none).unwrap(), 0);
    }
}
