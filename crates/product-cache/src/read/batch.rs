//! Many products in one request (`GET /products?ids=...`), with a single read's guarantees.
//!
//! The round trips, for products spread over the cluster's nodes, each step's nodes in
//! parallel:
//! 1. one `MGET` per node: every hit is answered from it, as stored, without a script;
//! 2. for the keys it found missing, the probe script per key (one round trip per node), which
//!    looks again and takes the key's lease, exactly as a single read's miss does;
//! 3. one `BatchGetItem` for the keys whose leases were granted and the keys Redis could not
//!    serve (a failing node, an open breaker), while the keys whose lease another reader holds
//!    wait for its fill (probing again, as a single read does, for at most `LEASE_WAIT_MS`);
//!    those it did not serve are read afterwards, in one more `BatchGetItem`, without a fill;
//! 4. the fills, each under its own lease and position as a single read's: after the answer,
//!    unless some key waits, and then as soon as the table has answered. A request that waits
//!    must not hold leases meanwhile: two batches each holding a key the other waits for would
//!    both wait out `LEASE_WAIT_MS` and read the other's key without filling it.
//!
//! So all misses cost two Redis round trips and one table read before the answer, and a
//! product whose key changes while the batch reads it is refused its fill as any other.

use std::time::Duration;

use super::{lookup_of, AfterAnswer, BatchIds, CacheStatus, Lookup, ReadError, ReadPath};
use crate::cache::{Cache, CacheError, Probe};
use crate::id::ProductId;
use crate::metrics;
use crate::store::ProductStore;

/// One product of a batch answer.
#[derive(Debug)]
pub struct BatchEntry {
    pub id: ProductId,
    pub status: CacheStatus,
    pub result: Result<Lookup, ReadError>,
}

/// A batch answer: every id asked for once, in request order.
#[derive(Debug)]
pub struct BatchAnswer {
    pub entries: Vec<BatchEntry>,
}

impl BatchAnswer {
    /// How many products took part in the cache as `status`.
    pub fn count(&self, status: CacheStatus) -> usize {
        self.entries.iter().filter(|e| e.status == status).count()
    }
}

/// Where one product of a batch stands between the steps.
enum Step {
    /// Answered.
    Done(CacheStatus, Result<Lookup, ReadError>),
    /// To be read from the table and filled under this batch's lease.
    Leased,
    /// Another reader holds the lease: waiting for its fill.
    Waiting,
    /// To be read from the table without a fill: Redis failed (`Bypass`), or the lease holder
    /// did not fill within `LEASE_WAIT_MS` (`Miss`).
    Unfilled(CacheStatus),
}

impl<C: Cache, S: ProductStore> ReadPath<C, S> {
    /// Looks many products up, fills included: [`ReadPath::answer_many`] and then what it
    /// left to do.
    pub async fn get_many(&self, ids: &BatchIds) -> BatchAnswer {
        let (answer, after) = self.answer_many(ids).await;
        after.await;
        answer
    }

    /// Looks many products up and returns as soon as the answer is known, with the fills still
    /// to run (see the module's doc for the steps). A product Redis cannot serve is answered
    /// from the table as a single read's bypass is; one the table cannot serve is an error in
    /// its entry, the others answered.
    #[tracing::instrument(skip_all, fields(products = ids.len()))]
    pub async fn answer_many(&self, ids: &BatchIds) -> (BatchAnswer, AfterAnswer) {
        let ids = ids.as_slice();
        self.metrics.incr(metrics::read::BATCH_READS);
        self.metrics
            .sample(metrics::read::BATCH_SIZE, ids.len() as u64);
        let keys: Vec<String> = ids
            .iter()
            .map(|id| id.cache_key(&self.settings.key_prefix))
            .collect();

        // 1. The hits.
        let got = self.cache.get_many(&keys).await;
        if got.iter().all(|got| matches!(got, Ok(Some(_)))) {
            // All hits, the common case: answered without the misses' steps, which are boxed
            // below so that a hit's future stays small (it is moved before it is polled).
            let values = got.into_iter().flat_map(|got| got.ok().flatten());
            let entries = ids
                .iter()
                .zip(values)
                .map(|(id, value)| BatchEntry {
                    id: id.clone(),
                    status: CacheStatus::Hit,
                    result: Ok(lookup_of(value)),
                })
                .collect();
            let answer = BatchAnswer { entries };
            self.count(&answer, 0);
            return (answer, AfterAnswer::nothing());
        }
        Box::pin(self.answer_misses(ids, keys, got)).await
    }

    /// Steps 2 to 4, for a batch whose hits' reads (`got`) left some products unanswered.
    async fn answer_misses(
        &self,
        ids: &[ProductId],
        keys: Vec<String>,
        got: Vec<Result<Option<String>, CacheError>>,
    ) -> (BatchAnswer, AfterAnswer) {
        let token = format!("{:032x}", fastrand::u128(..));
        // Leases that may have been granted behind a lost reply: handed back after the answer.
        let mut hand_back: Vec<usize> = Vec::new();
        let mut failures = Failures::default();
        let mut steps: Vec<Step> = got
            .into_iter()
            .map(|got| match got {
                Ok(Some(value)) => Step::Done(CacheStatus::Hit, Ok(lookup_of(value))),
                Ok(None) => Step::Waiting,
                Err(e) => {
                    failures.note(&e);
                    Step::Unfilled(CacheStatus::Bypass)
                }
            })
            .collect();

        // 2. The misses' leases (`Waiting` marks the keys still to probe).
        let missing: Vec<usize> = indexes(&steps, |s| matches!(s, Step::Waiting));
        self.probe_into(
            &missing,
            &keys,
            &token,
            &mut steps,
            &mut hand_back,
            &mut failures,
        )
        .await;

        // 3. The table, for the leased and the bypassed; meanwhile the waiters wait.
        let to_read = indexes(&steps, |s| matches!(s, Step::Leased | Step::Unfilled(_)));
        let waiting = indexes(&steps, |s| matches!(s, Step::Waiting));
        let has_waiters = !waiting.is_empty();
        let wait = self.wait_for_fills(ids, waiting, &keys, &token);
        let read_and_fill = async {
            let read = self.read_table(ids, &to_read).await;
            let mut fills = Vec::new();
            self.settle(
                &to_read,
                read,
                &keys,
                &token,
                &mut steps,
                &mut fills,
                &mut hand_back,
            );
            if has_waiters {
                // Filled now, not after the answer: this request waits for other readers'
                // fills anyway, and must not hold its own leases meanwhile. Two batches that
                // each hold a key the other waits for would otherwise both wait out
                // `LEASE_WAIT_MS` and read each other's key without filling it.
                run_fills(fills.drain(..), &keys).await;
            }
            fills
        };
        let (mut fills, waited) = tokio::join!(read_and_fill, wait);
        // The waiters the lease holders did not serve, and those that took over a lapsed lease.
        let late = waited.apply(&mut steps, &mut hand_back, &mut failures, &self.metrics);
        if !late.is_empty() {
            let read = self.read_table(ids, &late).await;
            self.settle(
                &late,
                read,
                &keys,
                &token,
                &mut steps,
                &mut fills,
                &mut hand_back,
            );
        }
        failures.log(keys.len());

        let entries: Vec<BatchEntry> = ids
            .iter()
            .zip(steps)
            .map(|(id, step)| {
                let (status, result) = match step {
                    Step::Done(status, result) => (status, result),
                    // `settle` answered every key it read; nothing else is left.
                    _ => unreachable!("a batch entry left unanswered"),
                };
                BatchEntry {
                    id: id.clone(),
                    status,
                    result,
                }
            })
            .collect();
        let answer = BatchAnswer { entries };
        self.count(&answer, failures.breaker);

        let releases: Vec<_> = hand_back
            .iter()
            .map(|&i| self.cache.release(&keys[i], &token))
            .collect();
        let after = if fills.is_empty() && releases.is_empty() {
            AfterAnswer::nothing()
        } else {
            AfterAnswer::run(async move {
                let released = async {
                    for result in futures::future::join_all(releases).await {
                        match result {
                            Ok(()) | Err(CacheError::BreakerOpen(_)) => {}
                            Err(e) => tracing::warn!(error = %e, "handing a lease back failed"),
                        }
                    }
                };
                futures::future::join(run_fills(fills, &keys), released).await;
            })
        };
        (answer, after)
    }

    /// Counts a batch's products by cache status, and those its open breakers bypassed.
    fn count(&self, answer: &BatchAnswer, breaker_bypasses: usize) {
        let (mut hits, mut misses, mut bypasses) = (0, 0, 0);
        for entry in &answer.entries {
            match entry.status {
                CacheStatus::Hit => hits += 1,
                CacheStatus::Miss => misses += 1,
                CacheStatus::Bypass => bypasses += 1,
            }
        }
        self.metrics.add(metrics::read::HITS, hits);
        self.metrics.add(metrics::read::MISSES, misses);
        self.metrics.add(metrics::read::BYPASSES, bypasses);
        self.metrics
            .add(metrics::read::BREAKER_BYPASSES, breaker_bypasses as u64);
    }

    /// Probes `which` keys (step 2, and each round of waiting): a hit is answered, a lease or a
    /// wait recorded, a failure bypasses (its lease handed back after a timeout, as a single
    /// read's).
    async fn probe_into(
        &self,
        which: &[usize],
        keys: &[String],
        token: &str,
        steps: &mut [Step],
        hand_back: &mut Vec<usize>,
        failures: &mut Failures,
    ) {
        if which.is_empty() {
            return;
        }
        let probe_keys: Vec<String> = which.iter().map(|&i| keys[i].clone()).collect();
        let probes = self
            .cache
            .probe_many(&probe_keys, token, self.settings.lease)
            .await;
        for (&i, probe) in which.iter().zip(probes) {
            steps[i] = match probe {
                Ok(Probe::Hit(value)) => Step::Done(CacheStatus::Hit, Ok(lookup_of(value))),
                Ok(Probe::Lease) => Step::Leased,
                Ok(Probe::Wait) => Step::Waiting,
                Err(e) => {
                    if e.may_have_run() {
                        hand_back.push(i);
                    }
                    failures.note(&e);
                    Step::Unfilled(CacheStatus::Bypass)
                }
            };
        }
    }

    /// Waits for other readers' fills of `waiting` keys, probing them again with the single
    /// read's backoff, for at most `LEASE_WAIT_MS`. Works on its own copy of the steps, so
    /// that it runs beside the table read.
    ///
    /// A waiter whose holder's lease lapsed takes the lease over (its probe answers `Lease`):
    /// that key is read from the table and filled at once, while the others go on waiting, so
    /// the request holds no lease it does not serve at once (one kept through the rest of the
    /// wait would lapse before its fill, and another reader would read the table again).
    async fn wait_for_fills(
        &self,
        ids: &[ProductId],
        waiting: Vec<usize>,
        keys: &[String],
        token: &str,
    ) -> Waited {
        {
            let mut waited = Waited {
                keys: waiting.clone(),
                ..Waited::default()
            };
            if waiting.is_empty() {
                return waited;
            }
            let since = tokio::time::Instant::now();
            let mut backoff = Duration::from_millis(2);
            let mut steps: Vec<Step> = keys
                .iter()
                .map(|_| Step::Unfilled(CacheStatus::Miss))
                .collect();
            for &i in &waiting {
                steps[i] = Step::Waiting;
            }
            loop {
                let still = indexes(&steps, |s| matches!(s, Step::Waiting));
                let left = self.settings.lease_wait.saturating_sub(since.elapsed());
                if still.is_empty() || left.is_zero() {
                    break;
                }
                tokio::time::sleep(backoff.min(left)).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
                self.probe_into(
                    &still,
                    keys,
                    token,
                    &mut steps,
                    &mut waited.hand_back,
                    &mut waited.failures,
                )
                .await;
                let taken_over = indexes(&steps, |s| matches!(s, Step::Leased));
                if !taken_over.is_empty() {
                    let read = self.read_table(ids, &taken_over).await;
                    let mut fills = Vec::new();
                    self.settle(
                        &taken_over,
                        read,
                        keys,
                        token,
                        &mut steps,
                        &mut fills,
                        &mut waited.hand_back,
                    );
                    run_fills(fills, keys).await;
                }
            }
            waited.time = since.elapsed();
            waited.steps = steps;
            waited
        }
    }

    /// Reads `which` products from the table, in one `BatchGetItem` (per 100).
    async fn read_table(
        &self,
        ids: &[ProductId],
        which: &[usize],
    ) -> Vec<Result<Option<crate::store::Item>, crate::store::StoreError>> {
        if which.is_empty() {
            return Vec::new();
        }
        let asked: Vec<ProductId> = which.iter().map(|&i| ids[i].clone()).collect();
        self.store.get_many(&asked).await
    }

    /// Answers `which` keys from what the table read for them: a leased key gets its fill
    /// (after the answer), or its lease back when the table failed it.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        which: &[usize],
        read: Vec<Result<Option<crate::store::Item>, crate::store::StoreError>>,
        keys: &[String],
        token: &str,
        steps: &mut [Step],
        fills: &mut Vec<FillWork>,
        hand_back: &mut Vec<usize>,
    ) {
        for (&i, read) in which.iter().zip(read) {
            let (leased, status) = match steps[i] {
                Step::Leased => (true, CacheStatus::Miss),
                Step::Unfilled(status) => (false, status),
                _ => continue,
            };
            let result = match self.read_of(read) {
                Ok((lookup, order)) => {
                    if leased {
                        fills.push((i, Box::pin(self.fill_work(&keys[i], token, &lookup, order))));
                    }
                    Ok(lookup)
                }
                Err(e) => {
                    if leased {
                        hand_back.push(i);
                    }
                    Err(e)
                }
            };
            steps[i] = Step::Done(status, result);
        }
    }
}

/// What waiting for other readers' fills came to, applied to the batch's steps afterwards.
#[derive(Default)]
struct Waited {
    keys: Vec<usize>,
    steps: Vec<Step>,
    hand_back: Vec<usize>,
    failures: Failures,
    time: Duration,
}

impl Waited {
    /// Moves the waiters' outcomes into `steps`; returns the keys still to read from the table.
    fn apply(
        self,
        steps: &mut [Step],
        hand_back: &mut Vec<usize>,
        failures: &mut Failures,
        metrics: &metrics::Recorder,
    ) -> Vec<usize> {
        if self.keys.is_empty() {
            return Vec::new();
        }
        // One request that waited, however many of its products did (as a single read counts).
        metrics.incr(metrics::read::LEASE_WAITS);
        metrics.sample(metrics::read::LEASE_WAIT_TIME, self.time.as_millis() as u64);
        hand_back.extend(self.hand_back);
        failures.merge(self.failures);
        let mut own = self.steps;
        let mut late = Vec::new();
        for &i in &self.keys {
            steps[i] = match std::mem::replace(&mut own[i], Step::Waiting) {
                // The holder did not fill in time: read, but leave the fill to it.
                Step::Waiting => Step::Unfilled(CacheStatus::Miss),
                other => other,
            };
            if !matches!(steps[i], Step::Done(..)) {
                late.push(i);
            }
        }
        late
    }
}

/// The Redis failures of one batch, logged once for the batch rather than once per product.
#[derive(Default)]
struct Failures {
    /// Products not asked of Redis: their node's breaker was open (no warning: the breaker
    /// logs its opening and closing).
    breaker: usize,
    failed: usize,
    first: Option<CacheError>,
}

impl Failures {
    fn note(&mut self, e: &CacheError) {
        if matches!(e, CacheError::BreakerOpen(_)) {
            self.breaker += 1;
        } else {
            self.failed += 1;
            self.first.get_or_insert_with(|| e.clone());
        }
    }

    fn merge(&mut self, other: Failures) {
        self.breaker += other.breaker;
        self.failed += other.failed;
        if self.first.is_none() {
            self.first = other.first;
        }
    }

    fn log(&self, products: usize) {
        if let Some(e) = &self.first {
            tracing::warn!(
                error = %e,
                failed = self.failed,
                products,
                "cache read failed for part of a batch; answering those from the table"
            );
        }
    }
}

/// A fill of one of a batch's products (its index), to run after the answer or at once.
type FillWork = (
    usize,
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, CacheError>> + Send>>,
);

/// Runs a request's fills together, and logs their failures once for the request, not once
/// per product.
async fn run_fills(fills: impl IntoIterator<Item = FillWork>, keys: &[String]) {
    let (which, work): (Vec<usize>, Vec<_>) = fills.into_iter().unzip();
    let outcomes = futures::future::join_all(work).await;
    let mut failed = which
        .iter()
        .zip(&outcomes)
        .filter_map(|(&i, outcome)| outcome.as_ref().err().map(|e| (i, e)));
    if let Some((first, e)) = failed.next() {
        super::log_failed_fills(e, 1 + failed.count(), &keys[first]);
    }
}

fn indexes(steps: &[Step], pick: impl Fn(&Step) -> bool) -> Vec<usize> {
    steps
        .iter()
        .enumerate()
        .filter(|(_, s)| pick(s))
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::memory::MemoryCache;
    use crate::config::CacheSettings;
    use crate::id::KeyType;
    use crate::read::tests::read_path;
    use crate::store::memory::MemoryStore;
    use std::sync::atomic::Ordering;

    fn ids(list: &str) -> BatchIds {
        BatchIds::parse(Some(&format!("ids={list}")), KeyType::S).unwrap()
    }

    fn summary(answer: &BatchAnswer) -> Vec<(String, CacheStatus, String)> {
        answer
            .entries
            .iter()
            .map(|e| {
                let result = match &e.result {
                    Ok(Lookup::Found(doc)) => doc.as_str().to_owned(),
                    Ok(Lookup::NotFound) => "null".to_owned(),
                    Err(e) => format!("error: {e}"),
                };
                (e.id.as_str().to_owned(), e.status, result)
            })
            .collect()
    }

    fn with_items(n: usize) -> ReadPath<MemoryCache, MemoryStore> {
        let rp = read_path();
        for i in 0..n {
            let id = format!("p{i}");
            rp.store.items.lock().unwrap().insert(
                id.clone(),
                [("productId".to_owned(), serde_dynamo::AttributeValue::S(id))].into(),
            );
        }
        rp
    }

    #[tokio::test]
    async fn misses_are_one_table_read_and_filled_then_hits_without_it() {
        let rp = with_items(3);
        let first = rp.get_many(&ids("p2,p0,nope,p1,p0")).await;
        let s = summary(&first);
        assert_eq!(
            s.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
            ["p2", "p0", "nope", "p1"],
            "request order, repeats collapsed"
        );
        assert!(s.iter().all(|e| e.1 == CacheStatus::Miss), "{s:?}");
        assert_eq!(s[2].2, "null");
        assert_eq!(s[0].2, r#"{"productId":"p2"}"#);
        assert_eq!(rp.store.batch_reads.load(Ordering::SeqCst), 1);
        assert_eq!(
            rp.cache.value("product:p2").as_deref(),
            Some(r#"{"productId":"p2"}"#)
        );
        assert_eq!(rp.cache.value("product:nope").as_deref(), Some("null"));
        let entries = rp.cache.entries.lock().unwrap().clone();
        assert_eq!(
            entries["product:nope"].1,
            CacheSettings::default().negative_ttl
        );
        assert_eq!(entries["product:p0"].1, CacheSettings::default().ttl);
        assert!(
            rp.cache.leases.lock().unwrap().is_empty(),
            "a lease was kept"
        );

        let second = rp.get_many(&ids("p0,p1,p2,nope")).await;
        assert!(second.entries.iter().all(|e| e.status == CacheStatus::Hit));
        assert_eq!(summary(&second)[0].2, r#"{"productId":"p0"}"#);
        assert_eq!(
            rp.store.batch_reads.load(Ordering::SeqCst),
            1,
            "hits read the table"
        );
    }

    #[tokio::test]
    async fn the_fills_are_left_to_the_after_work() {
        let rp = with_items(2);
        let (answer, after) = rp.answer_many(&ids("p0,p1")).await;
        assert_eq!(answer.count(CacheStatus::Miss), 2);
        // (The memory cache fills when a fill is built; against Redis, `batch_read.rs` shows
        // that nothing is written before the answer.)
        assert!(after.is_pending(), "no fill left for after the answer");
        after.await;
        assert!(rp.cache.value("product:p0").is_some() && rp.cache.value("product:p1").is_some());
    }

    #[tokio::test]
    async fn a_failing_key_bypasses_alone_and_is_not_filled() {
        let rp = with_items(3);
        rp.cache.fail_keys.lock().unwrap().push("product:p1".into());
        let answer = rp.get_many(&ids("p0,p1,p2")).await;
        let s = summary(&answer);
        assert_eq!(
            s.iter().map(|e| e.1).collect::<Vec<_>>(),
            [CacheStatus::Miss, CacheStatus::Bypass, CacheStatus::Miss]
        );
        assert_eq!(
            s[1].2, r#"{"productId":"p1"}"#,
            "the bypass was not answered"
        );
        assert_eq!(
            rp.store.batch_reads.load(Ordering::SeqCst),
            1,
            "not one table read"
        );
        assert_eq!(rp.cache.value("product:p1"), None, "filled without a lease");
        assert!(rp.cache.value("product:p0").is_some());
    }

    #[tokio::test]
    async fn an_open_breaker_or_a_failed_redis_answers_everything_from_the_table() {
        let rp = with_items(2);
        rp.cache.breaker_open.store(true, Ordering::SeqCst);
        let answer = rp.get_many(&ids("p0,p1")).await;
        assert_eq!(answer.count(CacheStatus::Bypass), 2);
        assert!(answer.entries.iter().all(|e| e.result.is_ok()));
        // One lookup, no lease, no fill, no release.
        assert_eq!(rp.cache.calls.load(Ordering::SeqCst), 1);

        rp.cache.breaker_open.store(false, Ordering::SeqCst);
        rp.cache.fail.store(true, Ordering::SeqCst);
        let answer = rp.get_many(&ids("p0,p1")).await;
        assert_eq!(answer.count(CacheStatus::Bypass), 2);
        assert!(answer.entries.iter().all(|e| e.result.is_ok()));
    }

    #[tokio::test]
    async fn leases_granted_behind_lost_replies_are_handed_back_after_the_answer() {
        let rp = with_items(2);
        rp.cache.lose_probe_replies.store(true, Ordering::SeqCst);
        let (answer, after) = rp.answer_many(&ids("p0,p1")).await;
        assert_eq!(answer.count(CacheStatus::Bypass), 2);
        assert_eq!(
            rp.cache.leases.lock().unwrap().len(),
            2,
            "no lease was granted"
        );
        after.await;
        assert!(
            rp.cache.leases.lock().unwrap().is_empty(),
            "a lease was kept"
        );
        assert_eq!(rp.cache.value("product:p0"), None);
    }

    #[tokio::test]
    async fn a_key_the_table_left_unread_is_an_error_its_lease_handed_back() {
        let rp = with_items(3);
        rp.store.unprocessed.lock().unwrap().push("p1".into());
        let answer = rp.get_many(&ids("p0,p1,p2")).await;
        let s = summary(&answer);
        assert!(s[1].2.starts_with("error:"), "{s:?}");
        assert!(!s[0].2.starts_with("error:") && !s[2].2.starts_with("error:"));
        assert!(
            rp.cache.leases.lock().unwrap().is_empty(),
            "the lease was kept"
        );
        assert_eq!(rp.cache.value("product:p1"), None);
        assert!(rp.cache.value("product:p2").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_served_by_the_holders_fill_and_the_rest_do_not_wait_for_it() {
        let rp = with_items(2);
        rp.cache
            .leases
            .lock()
            .unwrap()
            .insert("product:p1".into(), "holder".into());
        let filler = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            rp.cache.leases.lock().unwrap().remove("product:p1");
            rp.cache.entries.lock().unwrap().insert(
                "product:p1".into(),
                (r#"{"filled":true}"#.into(), Duration::from_secs(1)),
            );
        };
        let batch = ids("p0,p1");
        let (answer, ()) = tokio::join!(rp.get_many(&batch), filler);
        let s = summary(&answer);
        assert_eq!((s[0].1, s[1].1), (CacheStatus::Miss, CacheStatus::Hit));
        assert_eq!(s[1].2, r#"{"filled":true}"#);
        assert_eq!(
            rp.store.reads.load(Ordering::SeqCst),
            1,
            "the waiter read the table"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_after_lease_wait_and_reads_without_filling() {
        let rp = with_items(2);
        rp.cache
            .leases
            .lock()
            .unwrap()
            .insert("product:p1".into(), "someone".into());
        let started = tokio::time::Instant::now();
        let answer = rp.get_many(&ids("p0,p1")).await;
        assert!(started.elapsed() >= CacheSettings::default().lease_wait);
        let s = summary(&answer);
        assert_eq!(
            (s[1].1, s[1].2.as_str()),
            (CacheStatus::Miss, r#"{"productId":"p1"}"#)
        );
        assert_eq!(rp.store.batch_reads.load(Ordering::SeqCst), 2);
        assert_eq!(
            rp.cache.value("product:p1"),
            None,
            "filled without the lease"
        );
        assert_eq!(rp.cache.leases.lock().unwrap()["product:p1"], "someone");
        assert!(rp.cache.value("product:p0").is_some());
    }

    #[tokio::test]
    async fn a_change_during_the_read_refuses_that_fill_only() {
        let rp = with_items(2);
        rp.cache.refuse_fills.store(true, Ordering::SeqCst);
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let rp = rp.with_metrics(
            crate::metrics::MetricsSettings::default(),
            crate::metrics::Sink::Memory(lines.clone()),
        );
        let answer = rp.get_many(&ids("p0,p1,p0")).await;
        assert_eq!(answer.entries.len(), 2);
        rp.metrics().flush();
        let line: serde_json::Value = serde_json::from_str(&lines.lock().unwrap()[0]).unwrap();
        assert_eq!(
            (
                &line["Misses"],
                &line["RefusedFills"],
                &line["BatchReads"],
                &line["BatchSize"]
            ),
            (
                &serde_json::json!(2),
                &serde_json::json!(2),
                &serde_json::json!(1),
                &serde_json::json!([2])
            ),
            "{line}"
        );
    }
}
