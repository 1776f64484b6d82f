//! Cache warming: loads popular products before the first customer asks for them.
//!
//! Each id goes through [`ReadPath::get`], the read path's own lease-guarded lookup: a miss
//! takes the lease and fills, a hit is left alone, and a fill racing a price change is refused
//! exactly as it would be for a customer's read. Warming therefore needs no write path of its
//! own and cannot put an older price into the cache.

use std::path::Path;

use aws_sdk_dynamodb::types::AttributeValue;
use futures::stream::StreamExt as _;
use product_cache::cache::Cache;
use product_cache::read::{CacheStatus, Lookup, ReadPath};
use product_cache::store::ProductStore;

/// Reads in flight at once unless told otherwise.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Errors kept for the summary; the rest are only counted.
const ERROR_SAMPLES: usize = 5;

/// What warming did, per outcome.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WarmSummary {
    /// Missed and filled from the table.
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

/// Loads every id through `read`, at most `concurrency` at once, calling `done` as each one
/// finishes (the command line ticks a progress bar with it).
pub async fn warm<C: Cache, S: ProductStore>(
    read: &ReadPath<C, S>,
    ids: Vec<String>,
    concurrency: usize,
    done: impl Fn(),
) -> WarmSummary {
    let mut summary = WarmSummary::default();
    let mut results = futures::stream::iter(ids)
        .map(|id| async move {
            let (status, result) = read.get(&id).await;
            (id, status, result)
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((id, status, result)) = results.next().await {
        done();
        match (status, result) {
            (_, Ok(Lookup::NotFound)) => summary.not_found += 1,
            (CacheStatus::Hit, Ok(Lookup::Found(_))) => summary.already_cached += 1,
            (CacheStatus::Miss, Ok(Lookup::Found(_))) => summary.filled += 1,
            (CacheStatus::Bypass, Ok(Lookup::Found(_))) => {
                summary.record_error(id, "Redis could not be used; nothing was cached".into())
            }
            (_, Err(e)) => summary.record_error(id, local_stack::error::chain(&e)),
        }
    }
    summary
}

impl WarmSummary {
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

    #[tokio::test]
    async fn counts_each_outcome_and_fills_only_misses() {
        let store = MemoryStore::default();
        for id in ["a", "b", "c"] {
            store.items.lock().unwrap().insert(
                id.into(),
                [(
                    "productId".to_owned(),
                    serde_dynamo::AttributeValue::S(id.into()),
                )]
                .into(),
            );
        }
        let read = ReadPath::new(MemoryCache::default(), store, CacheSettings::default());
        assert_eq!(read.get("a").await.0, CacheStatus::Miss);
        let ids = ["a", "b", "c", "nope", "{bad}"].map(String::from).to_vec();
        let summary = warm(&read, ids, 2, || {}).await;
        assert_eq!(
            (
                summary.filled,
                summary.already_cached,
                summary.not_found,
                summary.errors
            ),
            (2, 1, 1, 1),
            "{summary}"
        );
        assert_eq!(summary.error_samples[0].0, "{bad}");
        // One table read for the first `get`, one per fill and one for the absent id.
        assert_eq!(read.store().reads.load(Ordering::SeqCst), 4);
        let again = warm(&read, vec!["b".into(), "c".into()], 2, || {}).await;
        assert_eq!(again.already_cached, 2);
    }

    #[test]
    fn id_files_skip_blanks_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids.txt");
        std::fs::write(&path, "# best sellers\nkb-001\n\n  mouse-001  \n").unwrap();
        assert_eq!(ids_from_file(&path).unwrap(), ["kb-001", "mouse-001"]);
    }
}
