//! A single node's batch of deletes, without a script: the positions read in one `MGET`, the
//! documents and leases deleted and the newer positions recorded in a pipeline after it.
//!
//! Why: in delete mode (without a version attribute) a batch is nothing but ordered deletes,
//! and Redis runs each `redis.call` of a script at several times the cost of the same command
//! pipelined (a 10,000-record batch cost the node ~4x what 10,000 pipelined `DEL`s cost, over
//! the budget of issue 9). Plain commands keep every guarantee the script gave, because:
//! - the compare needs no atomicity with the write here: only the invalidator writes a key's
//!   position in this case (fills record one only with a version attribute), and Lambda hands
//!   one item's records to one invocation at a time. Should two overlap anyway (a rollout of
//!   readers with a version attribute writing `V` positions), the worst is a position
//!   overwritten by an older or other-kind one: a later replay then deletes once more, which
//!   is never stale, only a miss;
//! - each document and lease is deleted before its position is recorded, on one connection,
//!   so a batch cut short (a dropped connection) never leaves a position recorded for a delete
//!   that did not happen: the retry finds the old position and deletes. A single node has no
//!   error that refuses a `DEL` but accepts the `SET` after it (an out-of-memory node refuses
//!   the `SET`, never the `DEL`). A cluster can (a multi-key `DEL` answered `TRYAGAIN` while
//!   its slot migrates, the `SET` still accepted), so clusters keep the script;
//! - positions are not recorded with a version attribute: fills compare against those, and
//!   they stay with the script, where compare and write are one step.
//!
//! The decisions are `apply.lua`'s for a delete (see there), and `newer.lua`'s comparison.

use crate::cache::{lease_key, version_key, CacheOp, OpKind, OrderKind, VERSION_TTL};

/// Whether `ops[group]` can go this way: deletes only, ordered by sequence number if at all.
pub(super) fn scriptless(ops: &[CacheOp], group: &[usize]) -> bool {
    group.iter().all(|&i| {
        let op = &ops[i];
        matches!(op.kind, OpKind::Delete)
            && op
                .order
                .as_ref()
                .is_none_or(|o| o.kind() == OrderKind::Sequence)
    })
}

/// The first request: one `MGET` of the positions of the ops of `group` that are ordered (one
/// command where a `GET` each cost the node a command dispatch per key), and which ops those
/// are. `None` when no op is ordered.
pub(super) fn read_positions(
    ops: &[CacheOp],
    group: &[usize],
    ordering: bool,
) -> (Option<redis::Cmd>, Vec<usize>) {
    if !ordering {
        return (None, Vec::new());
    }
    let mut mget = redis::cmd("MGET");
    let mut read = Vec::new();
    for &i in group {
        if ops[i].order.is_some() {
            mget.arg(version_key(&ops[i].key));
            read.push(i);
        }
    }
    ((!read.is_empty()).then_some(mget), read)
}

/// The second pipeline, from the positions the first read (`positions[j]` for op `read[j]`):
/// one `DEL` of the documents and leases of every op to delete, then a `SET` of each newer
/// position. Refused ops (not newer than their key's position) delete only when the batch also
/// held an unordered delete of their key. Empty when there is nothing to do. Also returns the
/// refused ops.
pub(super) fn write(
    ops: &[CacheOp],
    group: &[usize],
    read: &[usize],
    positions: Vec<Option<Vec<u8>>>,
) -> (redis::Pipeline, Vec<usize>) {
    let mut refused = Vec::new();
    let mut current = read.iter().copied().zip(positions).peekable();
    let mut delete = redis::cmd("DEL");
    let mut deleting = false;
    let mut record = Vec::new();
    for &i in group {
        let op = &ops[i];
        let position = match current.peek() {
            Some((j, _)) if *j == i => current.next().map(|(_, p)| p),
            _ => None,
        };
        // `None`: not ordered (or ordering off); `Some(None)`: ordered, no position yet.
        let applies = match (position, &op.order) {
            (Some(cur), Some(order)) => {
                let order = order.encode();
                let newer = match cur {
                    None => true,
                    // Another kind (or an older release's format) cannot be compared: the
                    // delete applies and its position replaces the other.
                    Some(cur) if cur.first() != order.as_bytes().first() => true,
                    Some(cur) => order.as_bytes() > cur.as_slice(),
                };
                if newer {
                    record.push((version_key(&op.key), order));
                }
                newer
            }
            _ => true,
        };
        if !applies {
            refused.push(i);
        }
        if applies || op.delete_if_refused {
            delete.arg(&op.key).arg(lease_key(&op.key));
            deleting = true;
        }
    }
    let mut pipe = redis::pipe();
    if deleting {
        pipe.add_command(delete);
    }
    for (key, order) in record {
        pipe.cmd("SET")
            .arg(key)
            .arg(order)
            .arg("EX")
            .arg(VERSION_TTL.as_secs());
    }
    (pipe, refused)
}
