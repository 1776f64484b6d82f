//! Collapsing a batch: each key's records become the one change that leaves the key as
//! applying them one by one would.

use super::Planned;
use crate::cache::{CacheOp, OpKind, Order};

/// One key's records of a batch, collapsed to the single op that leaves the key as applying
/// them one by one would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collapsed {
    pub op: CacheOp,
    /// The index of the key's first record in the batch: what a failure reports.
    pub first_record: usize,
}

/// Collapses each key's ops to one, keys in the order of their first record.
///
/// Applied one by one, an ordered op lands only if newer than the key's position, and an
/// unordered delete always lands. So of a key's ordered ops only the newest can decide the
/// document (the first op holding the highest position: every later one is refused after it),
/// and it lands exactly when it would have landed in sequence. An unordered delete after it
/// leaves the document deleted whatever happened, one before it leaves it deleted if the newest
/// is refused: both become `delete_if_refused`, the first also turns the op into a delete. A
/// flash sale's 1,000 changes of one item become one script call instead of 1,000 round trips.
pub fn collapse(plan: &[Planned]) -> Vec<Collapsed> {
    let mut by_key: std::collections::HashMap<&str, Vec<&Planned>> = Default::default();
    let mut keys = Vec::new();
    for p in plan {
        let ops = by_key.entry(p.op.key.as_str()).or_insert_with(|| {
            keys.push(p.op.key.as_str());
            Vec::new()
        });
        ops.push(p);
    }
    keys.into_iter()
        .map(|key| {
            let ops = &by_key[key];
            let first_record = ops[0].record;
            let newest = ops
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.op.order.as_ref().map(|o| (i, o)))
                .fold(None, |best: Option<(usize, &Order)>, (i, o)| match best {
                    Some((_, b)) if b >= o => best,
                    _ => Some((i, o)),
                });
            let Some((at, _)) = newest else {
                // Unordered deletes only.
                return Collapsed {
                    op: CacheOp::delete(key),
                    first_record,
                };
            };
            let delete_before = ops[..at].iter().any(|p| p.op.order.is_none());
            let delete_after = ops[at + 1..].iter().any(|p| p.op.order.is_none());
            let mut op = ops[at].op.clone();
            if delete_after {
                op.kind = OpKind::Delete;
            }
            op.delete_if_refused = delete_before || delete_after;
            Collapsed { op, first_record }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::memory::MemoryCache;
    use crate::cache::Cache as _;
    use crate::config::InvalidationMode;
    use crate::invalidate::tests::{batch, invalidator};
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn a_thousand_changes_of_one_key_are_one_op() {
        let inv = invalidator(InvalidationMode::Refresh);
        let records: Vec<(&str, Option<u64>)> = (0..1000).map(|i| ("hot", Some(100 + i))).collect();
        let event = batch(&records);
        let plan = inv.plan(event["Records"].as_array().unwrap());
        let collapsed = collapse(&plan);
        assert_eq!(collapsed.len(), 1);
        assert_eq!(collapsed[0].first_record, 0);
        assert_eq!(collapsed[0].op, plan[999].op, "the newest record decides");
        assert!(inv.handle(event).await.batch_item_failures.is_empty());
        assert_eq!(inv.cache.calls.load(Ordering::SeqCst), 1);
    }

    /// Collapsing changes nothing: for random histories of a few keys (ordered sets and
    /// deletes, some out of order, unordered deletes, repeats), applying the collapsed ops
    /// leaves the same documents, positions and leases as applying every op in turn.
    #[tokio::test]
    async fn collapsing_leaves_the_cache_as_applying_one_by_one_would() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let mut plan = Vec::new();
            for record in 0..rng.usize(1..12) {
                let key = format!("product:{}", rng.usize(0..3));
                let mut op = if rng.u8(0..5) == 0 {
                    CacheOp::delete(&key)
                } else {
                    CacheOp {
                        key: key.clone(),
                        kind: if rng.bool() {
                            OpKind::Delete
                        } else {
                            OpKind::Set {
                                value: format!("v{record}"),
                                ttl: Default::default(),
                            }
                        },
                        order: Order::version(&rng.u8(1..9).to_string(), rng.bool()),
                        created_ms: Some(0),
                        delete_if_refused: false,
                    }
                };
                op.key = key;
                plan.push(Planned {
                    record,
                    sequence_number: None,
                    op,
                });
            }
            let seeded = || {
                let cache = MemoryCache::default();
                for k in 0..3 {
                    let key = format!("product:{k}");
                    cache
                        .entries
                        .lock()
                        .unwrap()
                        .insert(key.clone(), ("old".into(), Default::default()));
                    cache
                        .leases
                        .lock()
                        .unwrap()
                        .insert(key.clone(), "reader".into());
                    if k > 0 {
                        cache
                            .versions
                            .lock()
                            .unwrap()
                            .insert(key, Order::version("4", false).unwrap());
                    }
                }
                cache
            };
            let (one_by_one, collapsed) = (seeded(), seeded());
            for p in &plan {
                one_by_one.apply(std::slice::from_ref(&p.op)).await.unwrap();
            }
            let ops: Vec<CacheOp> = collapse(&plan).into_iter().map(|c| c.op).collect();
            collapsed.apply(&ops).await.unwrap();
            let state = |c: &MemoryCache| {
                let mut e: Vec<_> = c
                    .entries
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect();
                let mut v: Vec<_> = c
                    .versions
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let mut l: Vec<_> = c.leases.lock().unwrap().keys().cloned().collect();
                e.sort();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                l.sort();
                (e, v, l)
            };
            assert_eq!(state(&collapsed), state(&one_by_one), "{plan:#?}");
        }
    }
}
