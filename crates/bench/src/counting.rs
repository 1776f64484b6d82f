//! The table's store with a count of what reaches DynamoDB, for the figures judged on table
//! reads: every `GetItem`, every `BatchGetItem` and the ids it asked for, and the slowest call
//! (moto's pauses show there). The counts are shared by every reader that holds them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use product_cache::id::ProductId;
use product_cache::store::{DynamoStore, Item, ManyItems, ProductStore, StoreError};

#[derive(Debug, Default)]
pub struct Counts {
    gets: AtomicU64,
    batches: AtomicU64,
    batch_ids: AtomicU64,
    slowest_us: AtomicU64,
}

/// The counts at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableReads {
    /// `GetItem` calls.
    pub gets: u64,
    /// `get_many` calls: one `BatchGetItem` each (a batch request has at most 100 ids, one
    /// `BatchGetItem`'s worth; its retries of unprocessed keys, which moto never leaves, are
    /// inside the call).
    pub batches: u64,
    /// The ids those `BatchGetItem`s asked for.
    pub batch_ids: u64,
    pub slowest_us: u64,
}

impl TableReads {
    /// Items read: one per `GetItem`, one per id of a `BatchGetItem`.
    pub fn items(&self) -> u64 {
        self.gets + self.batch_ids
    }
}

impl Counts {
    pub fn now(&self) -> TableReads {
        TableReads {
            gets: self.gets.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            batch_ids: self.batch_ids.load(Ordering::Relaxed),
            slowest_us: self.slowest_us.load(Ordering::Relaxed),
        }
    }

    fn took(&self, started: Instant) {
        self.slowest_us
            .fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// A [`DynamoStore`] that counts into shared [`Counts`].
pub struct Counting {
    inner: DynamoStore,
    counts: Arc<Counts>,
}

impl Counting {
    pub fn new(inner: DynamoStore, counts: Arc<Counts>) -> Self {
        Self { inner, counts }
    }
}

impl ProductStore for Counting {
    async fn get(&self, id: &ProductId) -> Result<Option<Item>, StoreError> {
        self.counts.gets.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let out = self.inner.get(id).await;
        self.counts.took(started);
        out
    }

    /// The table's own `get_many` (one `BatchGetItem`), not the trait's default, which would
    /// read the ids one `GetItem` at a time.
    async fn get_many(&self, ids: &[ProductId]) -> ManyItems {
        self.counts.batches.fetch_add(1, Ordering::Relaxed);
        self.counts
            .batch_ids
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        let started = Instant::now();
        let out = self.inner.get_many(ids).await;
        self.counts.took(started);
        out
    }
}
