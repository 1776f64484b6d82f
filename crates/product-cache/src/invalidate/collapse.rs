//! Collapsing a batch: each key's records become the one change that leaves the key as
//! applying them one by one would.

use std::collections::HashMap;

use super::Planned;
use crate::cache::{CacheOp, OpKind};

/// One key's records of a batch, collapsed to the single op that leaves the key as applying
/// them one by one would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collapsed {
    pub op: CacheOp,
    /// The index of the key's first record in the batch: what a failure reports.
    pub first_record: usize,
    /// The index of the record whose op this is (the one holding the key's newest position,
    /// else an unordered delete): where a refresh's document is rendered from when the plan
    /// left it for later.
    pub decided_by: usize,
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
///
/// One pass with a few numbers per key, not a list of each key's ops: at 10,000 records a list
/// per key was most of the cost of collapsing. The winning ops are moved out of `plan` (a
/// refresh's document is kilobytes; 1,000 of them cost a millisecond to copy), leaving a delete
/// in their place: what stays in `plan` is good for its keys and record indexes only.
pub fn collapse(plan: &mut [Planned]) -> Vec<Collapsed> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(plan.len());
    let plan_ref: &[Planned] = plan;
    let mut keys: Vec<Key> = Vec::new();
    for (at, p) in plan_ref.iter().enumerate() {
        let k = *index.entry(p.op.key.as_str()).or_insert_with(|| {
            keys.push(Key {
                first_record: p.record,
                newest: None,
                first_unordered: None,
                last_unordered: None,
            });
            keys.len() - 1
        });
        let key = &mut keys[k];
        match &p.op.order {
            None => {
                key.first_unordered.get_or_insert(at);
                key.last_unordered = Some(at);
            }
            // The first op holding the highest position; positions of different kinds do not
            // compare, and then the later op wins.
            Some(order) => match key.newest {
                Some(best) if plan_ref[best].op.order.as_ref().is_some_and(|b| b >= order) => {}
                _ => key.newest = Some(at),
            },
        }
    }
    drop(index);
    keys.into_iter()
        .map(|key| {
            let Some(at) = key.newest else {
                // Unordered deletes only.
                let any = key.first_unordered.expect("a key has at least one op");
                return Collapsed {
                    op: CacheOp::delete(plan[any].op.key.as_str()),
                    first_record: key.first_record,
                    decided_by: plan[any].record,
                };
            };
            let delete_before = key.first_unordered.is_some_and(|u| u < at);
            let delete_after = key.last_unordered.is_some_and(|u| u > at);
            let kind = std::mem::replace(&mut plan[at].op.kind, OpKind::Delete);
            let mut op = CacheOp {
                kind,
                ..plan[at].op.clone()
            };
            if delete_after {
                op.kind = OpKind::Delete;
            }
            op.delete_if_refused = delete_before || delete_after;
            Collapsed {
                op,
                first_record: key.first_record,
                decided_by: plan[at].record,
            }
        })
        .collect()
}

/// What collapsing needs to know of one key's ops (indexes into the plan).
struct Key {
    first_record: usize,
    /// The op holding the key's newest position.
    newest: Option<usize>,
    first_unordered: Option<usize>,
    last_unordered: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::memory::MemoryCache;
    use crate::cache::Cache as _;
    use crate::cache::Order;
    use crate::config::InvalidationMode;
    use crate::invalidate::tests::{batch, invalidator};
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn a_thousand_changes_of_one_key_are_one_op() {
        let inv = invalidator(InvalidationMode::Refresh);
        let records: Vec<(&str, Option<u64>)> = (0..1000).map(|i| ("hot", Some(100 + i))).collect();
        let event = batch(&records);
        let plan = inv.plan(event["Records"].as_array().unwrap());
        let collapsed = collapse(&mut plan.clone());
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
            let ops: Vec<CacheOp> = collapse(&mut plan.clone())
                .into_iter()
                .map(|c| c.op)
                .collect();
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
