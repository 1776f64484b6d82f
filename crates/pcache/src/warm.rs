//! Cache warming: loads popular products before the first customer asks for them.
//!
//! The ids go through [`ReadPath::get_many`], the read path's own lease-guarded batch lookup,
//! [`MAX_BATCH_IDS`] at a time: a miss takes the key's lease and fills, a hit is left alone,
//! and a fill racing a price change is refused exactly as it would be for a customer's read.
//! Warming therefore needs no write path of its own and cannot put an older price into the
//! cache. Batches rather than one read per id: one `BatchGetItem` and a round trip per node for
//! a hundred ids instead of a hundred of each (measured: see [`DEFAULT_CONCURRENCY`]).
//!
//! `filled` in the summary means what the read path's `Miss` means: missed, and read from the
//! table under the key's lease. The fill itself can still be refused, as any reader's can (the
//! key changed meanwhile, or the lease lapsed); the read path counts those in `RefusedFills`.

use std::collections::HashMap;
use std::path::Path;

use aws_sdk_dynamodb::types::AttributeValue;
use futures::stream::StreamExt as _;
use product_cache::cache::Cache;
use product_cache::id::ProductId;
use product_cache::read::{BatchEntry, BatchIds, CacheStatus, Lookup, ReadPath, MAX_BATCH_IDS};
use product_cache::store::ProductStore;

/// Batch reads (of up to [`MAX_BATCH_IDS`] ids each) in flight at once unless told otherwise.
///
/// Two: on the local stack (moto, debug build, a 2-core machine busy with other tests) 2,000
/// cold ids took 6.4 s with two batches in flight, 8.3 s with one, and 26 to 27 s read one by
/// one 16 at a time, as warming did before; already cached, 0.07 s against 0.26 to 0.32 s. Four
/// in flight took 3.1 s on the quiet machine, but on the busy one its batch reads outlasted
/// `LEASE_MS` (1 s: fills refused) and the SDK's timeouts (table errors); eight or sixteen in
/// flight failed most of their reads. On DynamoDB a `BatchGetItem` of 100 takes tens of milliseconds,
/// and more in flight mostly spends read capacity faster.
pub const DEFAULT_CONCURRENCY: usize = 2;
/// Errors kept for the summary; the rest are only counted.
const ERROR_SAMPLES: usize = 5;

/// What warming did, per outcome.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WarmSummary {
    /// Missed, and read from the table under the key's lease to fill it (see the module's doc).
    pub filled: usize,
    /// Already in the cache; left as it was.
    pub already_cached: usize,
    /// No such product (now cached as "not found" for a short while, as any read would).
    pub not_found: usize,
    /// The id was invalid, the table failed, or Redis could not be used.
    pub errors: usize,
    /// A few of the errors, `(id, reason)`.
    pub error_samples: Vec<(String, String)>,
}

impl std::fmt::Display for WarmSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "filled {}, already cached {}, not found {}, errors {}",
            self.filled, self.already_cached, self.not_found, self.errors
        )?;
        for (id, reason) in &self.error_samples {
            write!(f, "\n  {id}: {reason}")?;
        }
        if self.errors > self.error_samples.len() {
            write!(f, "\n  ...")?;
        }
        Ok(())
    }
}

/// Loads every id through `read`'s batch path, [`MAX_BATCH_IDS`] ids per batch and at most
/// `concurrency` batches in flight, calling `done` as each id is dealt with (the command line
/// ticks a progress bar with it).
///
/// Every id listed is counted once in the summary. An invalid id is an error of its own, never
/// sent (a batch with it would be refused whole). An id listed again is read once, and its
/// repeat counts as a read after the first would: already cached where the first filled it,
/// otherwise as the first.
pub async fn warm<C: Cache, S: ProductStore>(
    read: &ReadPath<C, S>,
    ids: Vec<String>,
    concurrency: usize,
    done: impl Fn(),
) -> WarmSummary {
    let mut summary = WarmSummary::default();
    let key_type = read.settings().key_type;
    // Each distinct valid id in the order listed, with how many times it is listed.
    let mut distinct: Vec<ProductId> = Vec::with_capacity(ids.len());
    let mut times: HashMap<ProductId, usize> = HashMap::with_capacity(ids.len());
    for raw in ids {
        match ProductId::parse(&raw, key_type) {
            Ok(id) => {
                let n = times.entry(id.clone()).or_default();
                if *n == 0 {
                    distinct.push(id);
                }
                *n += 1;
            }
            Err(e) => {
                summary.record_error(raw, local_stack::error::chain(&e));
                done();
            }
        }
    }
    let mut answers = futures::stream::iter(distinct.chunks(MAX_BATCH_IDS))
        .map(|chunk| async move {
            let batch =
                BatchIds::new(chunk.iter().cloned()).expect("distinct ids, at most a batch");
            read.get_many(&batch).await
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(answer) = answers.next().await {
        for entry in answer.entries {
            let listed = times.get(&entry.id).copied().unwrap_or(1);
            let outcome = Outcome::of(entry);
            for n in 0..listed {
                match (&outcome, n) {
                    (Outcome::Filled, 1..) => summary.already_cached += 1,
                    _ => summary.count(&outcome),
                }
                done();
            }
        }
    }
    summary
}

/// What warming one id came to.
enum Outcome {
    Filled,
    AlreadyCached,
    NotFound,
    Error(String, String),
}

impl Outcome {
    fn of(entry: BatchEntry) -> Self {
        let id = entry.id.as_str().to_owned();
        match (entry.status, entry.result) {
            (_, Ok(Lookup::NotFound)) => Outcome::NotFound,
            (CacheStatus::Hit, Ok(Lookup::Found(_))) => Outcome::AlreadyCached,
            (CacheStatus::Miss, Ok(Lookup::Found(_))) => Outcome::Filled,
            (CacheStatus::Bypass, Ok(Lookup::Found(_))) => {
                Outcome::Error(id, "Redis could not be used; nothing was cached".into())
            }
            (_, Err(e)) => Outcome::Error(id, local_stack::error::chain(&e)),
        }
    }
}

impl WarmSummary {
    fn count(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Filled => self.filled += 1,
            Outcome::AlreadyCached => self.already_cached += 1,
            Outcome::NotFound => self.not_found += 1,
            Outcome::Error(id, reason) => self.record_error(id.clone(), reason.clone()),
        }
    }

    fn record_error(&mut self, id: String, reason: String) {
        self.errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples.push((id, reason));
        }
    }
}

/// Ids from a file, one per line; blank lines and `#` comments are skipped.
pub fn ids_from_file(path: &Path) -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// The first `n` ids a `Scan` of the table returns (in the table's hash order, not by
/// popularity: a stand-in for a list of best sellers).
pub async fn first_ids(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    key_attribute: &str,
    n: usize,
) -> Result<Vec<String>, local_stack::seed::SeedError> {
    let mut ids = Vec::with_capacity(n);
    let mut start = None;
    while ids.len() < n {
        let out = client
            .scan()
            .table_name(table)
            .projection_expression("#k")
            .expression_attribute_names("#k", key_attribute)
            .limit((n - ids.len()).min(1000) as i32)
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .map_err(|e| local_stack::seed::SeedError::Dynamo {
                operation: "Scan",
                table: table.to_owned(),
                source: Box::new(e),
            })?;
        for item in out.items.unwrap_or_default() {
            if let Some(AttributeValue::S(id) | AttributeValue::N(id)) = item.get(key_attribute) {
                ids.push(id.clone());
            }
        }
        match out.last_evaluated_key {
            Some(key) if !key.is_empty() => start = Some(key),
            _ => break,
        }
    }
    ids.truncate(n);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use product_cache::cache::memory::MemoryCache;
    use product_cache::config::CacheSettings;
    use product_cache::store::memory::MemoryStore;
    use std::sync::atomic::Ordering;

    fn with_items(ids: impl IntoIterator<Item = String>) -> ReadPath<MemoryCache, MemoryStore> {
        let store = MemoryStore::default();
        for id in ids {
            store.items.lock().unwrap().insert(
                id.clone(),
                [("productId".to_owned(), serde_dynamo::AttributeValue::S(id))].into(),
            );
        }
        ReadPath::new(MemoryCache::default(), store, CacheSettings::default())
    }

    fn counts(summary: &WarmSummary) -> (usize, usize, usize, usize) {
        (
            summary.filled,
            summary.already_cached,
            summary.not_found,
            summary.errors,
        )
    }

    #[tokio::test]
    async fn counts_each_outcome_and_fills_only_misses() {
        let read = with_items(["a", "b", "c"].map(String::from));
        assert_eq!(read.get("a").await.0, CacheStatus::Miss);
        let ids = ["a", "b", "c", "nope", "{bad}"].map(String::from).to_vec();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let summary = warm(&read, ids, 2, || {
            done.fetch_add(1, Ordering::SeqCst);
        })
        .await;
        assert_eq!(counts(&summary), (2, 1, 1, 1), "{summary}");
        assert_eq!(done.load(Ordering::SeqCst), 5);
        assert_eq!(summary.error_samples[0].0, "{bad}");
        // One table read for the first `get`, then one batch read for the fills and the absent
        // id; the invalid id was never sent.
        assert_eq!(read.store().reads.load(Ordering::SeqCst), 4);
        assert_eq!(read.store().batch_reads.load(Ordering::SeqCst), 1);
        assert_eq!(read.cache().value("product:nope").as_deref(), Some("null"));
        let again = warm(&read, vec!["b".into(), "c".into()], 2, || {}).await;
        assert_eq!(counts(&again), (0, 2, 0, 0), "{again}");
        assert_eq!(
            read.store().batch_reads.load(Ordering::SeqCst),
            1,
            "hits read the table"
        );
    }

    #[tokio::test]
    async fn goes_in_batches_of_at_most_max_batch_ids() {
        let ids: Vec<String> = (0..2 * MAX_BATCH_IDS + 50)
            .map(|i| format!("p{i}"))
            .collect();
        let read = with_items(ids.clone());
        let done = std::sync::atomic::AtomicUsize::new(0);
        let summary = warm(&read, ids.clone(), 2, || {
            done.fetch_add(1, Ordering::SeqCst);
        })
        .await;
        assert_eq!(counts(&summary), (ids.len(), 0, 0, 0), "{summary}");
        assert_eq!(done.load(Ordering::SeqCst), ids.len());
        assert_eq!(read.store().batch_reads.load(Ordering::SeqCst), 3);
        assert_eq!(read.store().reads.load(Ordering::SeqCst), ids.len());
        assert!(ids
            .iter()
            .all(|id| read.cache().value(&format!("product:{id}")).is_some()));
    }

    #[tokio::test]
    async fn an_id_listed_again_is_read_once_and_counted_as_a_read_after_the_first() {
        let read = with_items(["a", "b"].map(String::from));
        assert_eq!(read.get("b").await.0, CacheStatus::Miss);
        let ids = ["a", "nope", "a", "b", "nope", "b", "a"]
            .map(String::from)
            .to_vec();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let summary = warm(&read, ids, 1, || {
            done.fetch_add(1, Ordering::SeqCst);
        })
        .await;
        // `a`: filled, then already cached twice; `b`: already cached both times; `nope`: absent
        // both times.
        assert_eq!(counts(&summary), (1, 4, 2, 0), "{summary}");
        assert_eq!(done.load(Ordering::SeqCst), 7);
        assert_eq!(
            read.store().reads.load(Ordering::SeqCst),
            1 + 2,
            "a repeat was read"
        );
    }

    #[tokio::test]
    async fn ids_with_commas_and_percent_signs_are_warmed_as_themselves() {
        let odd = ["a,b", "50%", "x&ids=y", "caf\u{e9} au lait"].map(String::from);
        let read = with_items(odd.clone());
        let summary = warm(&read, odd.to_vec(), 1, || {}).await;
        assert_eq!(counts(&summary), (4, 0, 0, 0), "{summary}");
        for id in &odd {
            assert!(
                read.cache().value(&format!("product:{id}")).is_some(),
                "{id}"
            );
        }
    }

    #[tokio::test]
    async fn redis_and_table_failures_are_errors_of_their_ids() {
        let read = with_items(["a", "b", "c"].map(String::from));
        read.store().unprocessed.lock().unwrap().push("b".into());
        let summary = warm(&read, ["a", "b"].map(String::from).to_vec(), 1, || {}).await;
        assert_eq!(counts(&summary), (1, 0, 0, 1), "{summary}");
        assert_eq!(summary.error_samples[0].0, "b");

        read.cache().fail.store(true, Ordering::SeqCst);
        let summary = warm(&read, vec!["c".into()], 1, || {}).await;
        assert_eq!(counts(&summary), (0, 0, 0, 1), "{summary}");
        assert_eq!(
            summary.error_samples[0],
            (
                "c".into(),
                "Redis could not be used; nothing was cached".into()
            )
        );
    }

    #[test]
    fn id_files_skip_blanks_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids.txt");
        std::fs::write(&path, "# best sellers\nkb-001\n\n  mouse-001  \n").unwrap();
        assert_eq!(ids_from_file(&path).unwrap(), ["kb-001", "mouse-001"]);
    }
}
