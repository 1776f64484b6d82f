//! Wrappers that inject faults into the real backends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use product_cache::cache::{BatchError, Cache, CacheError, CacheOp, Fill, Probe};
use product_cache::id::ProductId;
use product_cache::store::{Item, ManyItems, ProductStore, StoreError};

/// The invalidator's cache: when armed, the next `apply` applies only a prefix of its ops and
/// then fails, as a Redis that dies mid-pipeline would.
pub struct FailingCache<C> {
    pub inner: C,
    armed: Mutex<Option<usize>>,
    /// When a batch failed because a replica did not confirm it (`CacheError::Unconfirmed`):
    /// the game day requires none while a shard merely has fewer replicas than configured.
    pub unconfirmed: Mutex<Vec<std::time::Instant>>,
    /// When a batch was acknowledged with a node confirmed by fewer replicas than configured.
    pub under_replicated: Mutex<Vec<std::time::Instant>>,
}

impl<C> FailingCache<C> {
    pub fn new(inner: C) -> Self {
        Self {
            inner,
            armed: Mutex::new(None),
            unconfirmed: Mutex::default(),
            under_replicated: Mutex::default(),
        }
    }

    /// The next `apply` applies its first `prefix` ops, then fails.
    pub fn arm(&self, prefix: usize) {
        *self.armed.lock().unwrap() = Some(prefix);
    }

    /// Disarms; true if the armed failure had not been used.
    pub fn disarm(&self) -> bool {
        self.armed.lock().unwrap().take().is_some()
    }
}

impl<C: Cache> Cache for FailingCache<C> {
    async fn probe(&self, key: &str, token: &str, lease: Duration) -> Result<Probe, CacheError> {
        self.inner.probe(key, token, lease).await
    }

    async fn get_many(&self, keys: &[String]) -> Vec<Result<Option<String>, CacheError>> {
        self.inner.get_many(keys).await
    }

    async fn probe_many(
        &self,
        keys: &[String],
        token: &str,
        lease: Duration,
    ) -> Vec<Result<Probe, CacheError>> {
        self.inner.probe_many(keys, token, lease).await
    }

    fn fill(
        &self,
        fill: Fill,
    ) -> impl std::future::Future<Output = Result<bool, CacheError>> + Send + 'static {
        self.inner.fill(fill)
    }

    fn release(
        &self,
        key: &str,
        token: &str,
    ) -> impl std::future::Future<Output = Result<(), CacheError>> + Send + 'static {
        self.inner.release(key, token)
    }

    async fn apply(&self, ops: &[CacheOp]) -> Result<product_cache::cache::Applied, BatchError> {
        let armed = self.armed.lock().unwrap().take();
        let Some(prefix) = armed else {
            let applied = self.inner.apply(ops).await;
            let log = match &applied {
                Err(BatchError {
                    source: CacheError::Unconfirmed { .. },
                    ..
                }) => Some(&self.unconfirmed),
                Ok(a) if !a.under_replicated.is_empty() => Some(&self.under_replicated),
                _ => None,
            };
            if let Some(log) = log {
                log.lock().unwrap().push(std::time::Instant::now());
            }
            return applied;
        };
        let prefix = prefix.min(ops.len());
        if prefix > 0 {
            self.inner.apply(&ops[..prefix]).await?;
        }
        Err(BatchError {
            failed: (prefix..ops.len()).collect(),
            source: CacheError::Unexpected(format!(
                "injected failure after {prefix} of {} ops",
                ops.len()
            )),
        })
    }
}

/// The readers' table: some reads pause after the table answered, for longer than the lease, so
/// their fills race invalidations and their leases lapse. A batch's `BatchGetItem` pauses as
/// often as a `GetItem`, holding back every fill of the batch. A clone shares the random draws
/// and the counts.
#[derive(Clone)]
pub struct SlowStore<S> {
    pub inner: S,
    pub rng: Arc<Mutex<fastrand::Rng>>,
    pub probability: f64,
    /// Drawn uniformly from this range.
    pub pause: (Duration, Duration),
    /// Products read (one per `GetItem`, one per id of a `BatchGetItem`), table reads that
    /// were slowed, and `BatchGetItem`s, shared by every reader's store.
    pub reads: Arc<AtomicU64>,
    pub slowed: Arc<AtomicU64>,
    pub batches: Arc<AtomicU64>,
}

impl<S> SlowStore<S> {
    /// After a table read: pauses, with `probability`.
    async fn maybe_pause(&self) {
        let pause = {
            let mut rng = self.rng.lock().unwrap();
            (rng.f64() < self.probability).then(|| {
                let (lo, hi) = (self.pause.0.as_micros(), self.pause.1.as_micros());
                Duration::from_micros(rng.u64(lo as u64..=hi as u64))
            })
        };
        if let Some(pause) = pause {
            self.slowed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
        }
    }
}

impl<S: ProductStore> ProductStore for SlowStore<S> {
    async fn get(&self, id: &ProductId) -> Result<Option<Item>, StoreError> {
        let result = self.inner.get(id).await;
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.maybe_pause().await;
        result
    }

    /// The inner store's own batch read (the table's: one `BatchGetItem`), not the trait's
    /// default of one `GetItem` per id.
    async fn get_many(&self, ids: &[ProductId]) -> ManyItems {
        let result = self.inner.get_many(ids).await;
        self.reads.fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.maybe_pause().await;
        result
    }
}
