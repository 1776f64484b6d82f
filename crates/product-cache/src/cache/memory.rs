//! An in-memory [`Cache`] for unit tests (feature `test-support`): the same semantics as the
//! scripts, no TTLs, and the failures the tests inject (all calls, an open breaker, some keys of
//! a batch, a lost probe reply, refused fills) as switches rather than wrappers around it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Applied, BatchError, Cache, CacheError, CacheOp, Fill, OpKind, Order, Probe};

#[derive(Default)]
pub struct MemoryCache {
    // A std Mutex: it is never held across an await.
    pub entries: Mutex<HashMap<String, (String, Duration)>>,
    /// Shared with the release futures, which hand a lease back when awaited, as Redis's do.
    pub leases: Arc<Mutex<HashMap<String, String>>>,
    pub versions: Mutex<HashMap<String, Order>>,
    /// Every call fails.
    pub fail: AtomicBool,
    /// Every call fails at once, as through a node's open circuit breaker.
    pub breaker_open: AtomicBool,
    /// A batch's ops on these keys fail; the others are applied. A batch read's too.
    pub fail_keys: Mutex<Vec<String>>,
    /// A probe is carried out, but its reply is lost: the caller sees a timeout.
    pub lose_probe_replies: AtomicBool,
    /// Every fill is refused, as if each lease had been cancelled by a change.
    pub refuse_fills: AtomicBool,
    pub calls: AtomicUsize,
}

impl MemoryCache {
    fn enter(&self) -> Result<(), CacheError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.breaker_open.load(Ordering::SeqCst) {
            return Err(CacheError::BreakerOpen("memory".into()));
        }
        if self.fail.load(Ordering::SeqCst) {
            // An error reply: the call did not run (so no lease to hand back).
            Err(CacheError::Redis(::redis::RedisError::from((
                ::redis::ErrorKind::Server(::redis::ServerErrorKind::ResponseError),
                "injected failure",
            ))))
        } else {
            Ok(())
        }
    }

    /// `fill.lua`, done at once: the returned future only carries the result.
    fn fill_now(&self, f: Fill) -> bool {
        let mut leases = self.leases.lock().unwrap();
        if leases.get(&f.key) != Some(&f.token) {
            return false;
        }
        if let Some(order) = &f.order {
            let mut versions = self.versions.lock().unwrap();
            match versions.get(&f.key).map(|cur| newer(cur, order)) {
                Some(Some(true)) => {
                    leases.remove(&f.key);
                    return false;
                }
                Some(None) => {} // the other kind: the lease alone guards the fill
                None | Some(Some(false)) => {
                    versions.insert(f.key.clone(), order.clone());
                }
            }
        }
        leases.remove(&f.key);
        self.entries.lock().unwrap().insert(f.key, (f.value, f.ttl));
        true
    }

    pub fn value(&self, key: &str) -> Option<String> {
        self.entries.lock().unwrap().get(key).map(|e| e.0.clone())
    }
}

/// `newer.lua`: `None` when the positions are of different kinds.
fn newer(a: &Order, b: &Order) -> Option<bool> {
    a.partial_cmp(b).map(|o| o.is_gt())
}

impl Cache for MemoryCache {
    async fn probe(&self, key: &str, token: &str, _: Duration) -> Result<Probe, CacheError> {
        self.enter()?;
        let probe = if let Some(v) = self.value(key) {
            Probe::Hit(v)
        } else {
            let mut leases = self.leases.lock().unwrap();
            if leases.contains_key(key) {
                Probe::Wait
            } else {
                leases.insert(key.to_owned(), token.to_owned());
                Probe::Lease
            }
        };
        if self.lose_probe_replies.load(Ordering::SeqCst) {
            return Err(CacheError::Timeout(Duration::from_millis(100)));
        }
        Ok(probe)
    }

    /// One call; a key in `fail_keys` fails, as on a node that timed out.
    async fn get_many(&self, keys: &[String]) -> Vec<Result<Option<String>, CacheError>> {
        let entered = self.enter();
        let fail_keys = self.fail_keys.lock().unwrap();
        keys.iter()
            .map(|key| match &entered {
                Err(e) => Err(e.clone()),
                Ok(()) if fail_keys.contains(key) => {
                    Err(CacheError::Timeout(Duration::from_millis(100)))
                }
                Ok(()) => Ok(self.value(key)),
            })
            .collect()
    }

    fn fill(
        &self,
        f: Fill,
    ) -> impl std::future::Future<Output = Result<bool, CacheError>> + Send + 'static {
        std::future::ready(
            self.enter()
                .map(|()| !self.refuse_fills.load(Ordering::SeqCst) && self.fill_now(f)),
        )
    }

    fn release(
        &self,
        key: &str,
        token: &str,
    ) -> impl std::future::Future<Output = Result<(), CacheError>> + Send + 'static {
        let entered = self.enter();
        let (leases, key, token) = (Arc::clone(&self.leases), key.to_owned(), token.to_owned());
        async move {
            entered?;
            let mut leases = leases.lock().unwrap();
            if leases.get(&key) == Some(&token) {
                leases.remove(&key);
            }
            Ok(())
        }
    }

    async fn apply(&self, ops: &[CacheOp]) -> Result<Applied, BatchError> {
        self.enter().map_err(|e| BatchError::all(ops.len(), e))?;
        let mut entries = self.entries.lock().unwrap();
        let mut versions = self.versions.lock().unwrap();
        let fail_keys = self.fail_keys.lock().unwrap();
        let (mut refused, mut failed) = (Vec::new(), Vec::new());
        for (i, op) in ops.iter().enumerate() {
            if fail_keys.contains(&op.key) {
                failed.push(i);
                continue;
            }
            // An in-memory cache never loses its data: every record is newer than its epoch.
            let mut kind = &op.kind;
            if let Some(order) = &op.order {
                match versions.get(&op.key).map(|cur| newer(order, cur)) {
                    Some(Some(false)) => {
                        refused.push(i);
                        if op.delete_if_refused {
                            self.leases.lock().unwrap().remove(&op.key);
                            entries.remove(&op.key);
                        }
                        continue;
                    }
                    Some(None) => kind = &OpKind::Delete, // the other kind: cannot be ordered
                    None | Some(Some(true)) => {}
                }
                versions.insert(op.key.clone(), order.clone());
            }
            self.leases.lock().unwrap().remove(&op.key);
            match kind {
                OpKind::Delete => {
                    entries.remove(&op.key);
                }
                OpKind::Set { value, ttl } => {
                    entries.insert(op.key.clone(), (value.clone(), *ttl));
                }
            }
        }
        if failed.is_empty() {
            Ok(Applied {
                refused,
                ..Applied::default()
            })
        } else {
            Err(BatchError {
                failed,
                source: CacheError::Timeout(Duration::from_millis(100)),
            })
        }
    }
}
