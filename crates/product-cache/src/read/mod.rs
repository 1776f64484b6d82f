//! The read path: cache-aside for `GET /products/{id}`.
//!
//! [`ReadPath::get`] holds the logic, and [`ReadPath::get_many`] (`batch.rs`) the same for many
//! products in one request (`GET /products?ids=...`); [`http`] is their HTTP edge (API Gateway HTTP API, payload
//! v2, through `lambda_http`), used unchanged by the Lambda and by the local stack.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

mod batch;
pub mod deferred;
mod event;
pub mod http;
mod ids;

pub use batch::{BatchAnswer, BatchEntry};
pub use http::{handle_request, Answer};
pub use ids::{BatchIds, InvalidBatch, MAX_BATCH_IDS};

use crate::cache::{Cache, CacheError, Fill, Order, Probe, NOT_FOUND};
use crate::config::CacheSettings;
use crate::document::{Document, DocumentError};
use crate::id::{InvalidId, ProductId};
use crate::metrics::{self, MetricsSettings, Recorder, Sink};
use crate::store::{ProductStore, StoreError};

/// How the cache took part in an answer; sent as the `X-Cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Answered from Redis.
    Hit,
    /// Redis answered that it had nothing; the table did, and the answer was cached.
    Miss,
    /// Redis was not used: it failed or timed out (or the request never got that far).
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
        }
    }
}

/// A successful lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Document),
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The caller's mistake.
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
    /// The table failed; the cache could not answer either.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The table holds an item with no JSON form (not expected from real DynamoDB).
    #[error(transparent)]
    Document(#[from] DocumentError),
}

/// What is left of a request once its answer is ready: the fill (or handing a lease back), which
/// needs no reply before the caller's. Awaiting it runs it; dropping it abandons it, and the
/// lease it held lapses after `LEASE_MS`.
#[must_use = "a fill left unawaited never happens"]
pub struct AfterAnswer(Option<Pin<Box<dyn Future<Output = ()> + Send + 'static>>>);

impl AfterAnswer {
    fn nothing() -> Self {
        Self(None)
    }

    fn run(work: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(Some(Box::pin(work)))
    }

    /// Whether there is anything to run.
    pub fn is_pending(&self) -> bool {
        self.0.is_some()
    }
}

impl IntoFuture for AfterAnswer {
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

    fn into_future(self) -> Self::IntoFuture {
        self.0.unwrap_or_else(|| Box::pin(std::future::ready(())))
    }
}

/// Cache-aside over a [`Cache`] and a [`ProductStore`]. Built once per process; cheap to share.
pub struct ReadPath<C, S> {
    cache: C,
    store: S,
    settings: CacheSettings,
    metrics: Arc<Recorder>,
}

impl<C: Cache, S: ProductStore> ReadPath<C, S> {
    pub fn new(cache: C, store: S, settings: CacheSettings) -> Self {
        Self {
            cache,
            store,
            settings,
            metrics: Arc::new(Recorder::off("read", &metrics::read::ALL)),
        }
    }

    /// Where the metrics go ([`http::handle_request`] flushes them after each request).
    pub fn with_metrics(mut self, settings: MetricsSettings, sink: Sink) -> Self {
        Arc::get_mut(&mut self.metrics)
            .expect("metrics are set before the read path is shared")
            .set_sink(settings, sink);
        self
    }

    pub fn metrics(&self) -> &Recorder {
        &self.metrics
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn cache(&self) -> &C {
        &self.cache
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Looks a product up, fill included: [`ReadPath::answer`] and then what it left to do. The
    /// status is returned also on error, for the `X-Cache` header.
    pub async fn get(&self, raw_id: &str) -> (CacheStatus, Result<Lookup, ReadError>) {
        let (status, result, after) = self.answer(raw_id).await;
        after.await;
        (status, result)
    }

    /// Looks a product up and returns as soon as the answer is known, with the fill still to
    /// run: a caller that can respond first (the Lambda function) saves the fill's round trip
    /// on every miss.
    ///
    /// A miss takes the key's lease before reading the table, and the fill succeeds only while
    /// the lease is held: an invalidation in between cancels it, so a read of the old item can
    /// never be written back over the change (the stale-fill race). Readers that find another
    /// reader's lease wait for its fill instead of all reading the table (the stampede).
    #[tracing::instrument(skip(self), fields(cache))]
    pub async fn answer(
        &self,
        raw_id: &str,
    ) -> (CacheStatus, Result<Lookup, ReadError>, AfterAnswer) {
        let id = match ProductId::parse(raw_id, self.settings.key_type) {
            Ok(id) => id,
            Err(e) => {
                self.metrics.incr(metrics::read::INVALID_REQUESTS);
                return (CacheStatus::Bypass, Err(e.into()), AfterAnswer::nothing());
            }
        };
        let key = id.cache_key(&self.settings.key_prefix);
        let token = format!("{:032x}", fastrand::u128(..));

        let waited_since = tokio::time::Instant::now();
        let mut waited = false;
        let mut backoff = Duration::from_millis(2);
        // A lease to hand back although the probe failed (its reply may have been lost).
        let mut hand_back = None;
        let (status, holds_lease) = loop {
            match self.cache.probe(&key, &token, self.settings.lease).await {
                Ok(Probe::Hit(cached)) => {
                    tracing::Span::current().record("cache", "hit");
                    self.note_wait(waited, waited_since);
                    self.metrics.incr(metrics::read::HITS);
                    return (
                        CacheStatus::Hit,
                        Ok(lookup_of(cached)),
                        AfterAnswer::nothing(),
                    );
                }
                Ok(Probe::Lease) => break (CacheStatus::Miss, true),
                Ok(Probe::Wait) => {
                    waited = true;
                    let left = self
                        .settings
                        .lease_wait
                        .saturating_sub(waited_since.elapsed());
                    if left.is_zero() {
                        // The filler is late; answer from the table but leave the fill to it.
                        break (CacheStatus::Miss, false);
                    }
                    // Probing again also takes over a lease whose holder died, once it lapses.
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Err(CacheError::BreakerOpen(_)) => {
                    // The key's node failed its last calls: not asked at all, so no lease was
                    // taken and none is handed back. No warning per read: the breaker logs its
                    // opening and closing once.
                    self.metrics.incr(metrics::read::BREAKER_BYPASSES);
                    break (CacheStatus::Bypass, false);
                }
                Err(e) => {
                    tracing::warn!(error = %e, key, "cache read failed; answering from the table");
                    if e.may_have_run() {
                        // The reply may have been lost (a timeout, a connection cut) after
                        // Redis granted the lease: hand it back after the answer, so Redis's
                        // trouble costs this answer nothing more and the next reader does not
                        // wait for the lease to lapse. In the after-work, not a spawned task:
                        // on Lambda that would be frozen with the environment, lease and all,
                        // as soon as the answer is out.
                        hand_back = Some(self.cache.release(&key, &token));
                    }
                    break (CacheStatus::Bypass, false);
                }
            }
        };
        tracing::Span::current().record("cache", status.as_str());
        self.note_wait(waited, waited_since);
        self.metrics.incr(match status {
            CacheStatus::Bypass => metrics::read::BYPASSES,
            _ => metrics::read::MISSES,
        });

        let (lookup, order) = match self.read_of(self.store.get(&id).await) {
            Ok(read) => read,
            Err(e) => {
                // Nothing to fill with: hand the lease back, or every reader of this key waits
                // out `LEASE_MS` while the table fails, even after it has recovered.
                if holds_lease {
                    hand_back = Some(self.cache.release(&key, &token));
                }
                return (status, Err(e), handing_back(hand_back));
            }
        };
        if !holds_lease {
            return (status, Ok(lookup), handing_back(hand_back));
        }
        let after = self.filling(&key, &token, &lookup, order);
        (status, Ok(lookup), after)
    }

    /// The fill of `key` with what the table answered, run after the answer while `token`
    /// holds its lease; if the fill fails, the lease is handed back.
    fn filling(
        &self,
        key: &str,
        token: &str,
        lookup: &Lookup,
        order: Option<Order>,
    ) -> AfterAnswer {
        let fill = self.fill_work(key, token, lookup, order);
        let key = key.to_owned();
        AfterAnswer::run(async move {
            if let Err(e) = fill.await {
                log_failed_fills(&e, 1, &key);
            }
        })
    }

    /// The fill itself, its lease handed back if it failed, and its outcome for the caller to
    /// log (once per request: a batch's fills are many).
    fn fill_work(
        &self,
        key: &str,
        token: &str,
        lookup: &Lookup,
        order: Option<Order>,
    ) -> impl Future<Output = Result<bool, CacheError>> + Send + 'static {
        let (value, ttl) = match lookup {
            Lookup::Found(doc) => (doc.as_str().to_owned(), self.settings.ttl),
            Lookup::NotFound => (NOT_FOUND.to_owned(), self.settings.negative_ttl),
        };
        // Boxed: the trait's futures own what they need ('static), but their types name the
        // cache's borrow.
        let fill: Pin<Box<dyn Future<Output = Result<bool, CacheError>> + Send>> =
            Box::pin(self.cache.fill(Fill {
                key: key.to_owned(),
                token: token.to_owned(),
                value,
                ttl,
                order,
            }));
        // Built now, run later: the release must be ready should the fill fail.
        let release: Pin<Box<dyn Future<Output = Result<(), CacheError>> + Send>> =
            Box::pin(self.cache.release(key, token));
        let metrics = Arc::clone(&self.metrics);
        let key = key.to_owned();
        async move {
            let outcome = fill.await;
            match &outcome {
                Ok(true) => {}
                // Refused: the lease was cancelled by a change, or the fill was older than the
                // key's position (the script then handed the lease back itself).
                Ok(false) => {
                    metrics.incr(metrics::read::REFUSED_FILLS);
                    tracing::debug!(key, "fill refused: the key changed since the lease")
                }
                // Not sent: the key's node failed its last calls, and would refuse the
                // hand-back too; the lease lapses after `LEASE_MS`.
                Err(CacheError::BreakerOpen(_)) => {}
                // It may not have landed; if not, its lease must not outlive it.
                Err(_) => {
                    if let Err(e) = release.await {
                        tracing::debug!(error = %e, key, "handing the lease back failed");
                    }
                }
            }
            outcome
        }
    }

    /// What the table answered for one product, as the read path serves and fills it: the
    /// document (or "not found") and its version.
    fn read_of(
        &self,
        read: Result<Option<crate::store::Item>, StoreError>,
    ) -> Result<(Lookup, Option<Order>), ReadError> {
        match read {
            Ok(Some(item)) => Document::from_item(&item)
                .map(|doc| (Lookup::Found(doc), self.version_of(&item)))
                .map_err(ReadError::from),
            Ok(None) => Ok((Lookup::NotFound, None)),
            Err(e) => Err(e.into()),
        }
    }

    /// A request that found another reader's lease: counted, with how long it waited.
    fn note_wait(&self, waited: bool, since: tokio::time::Instant) {
        if waited {
            self.metrics.incr(metrics::read::LEASE_WAITS);
            self.metrics.sample(
                metrics::read::LEASE_WAIT_TIME,
                since.elapsed().as_millis() as u64,
            );
        }
    }

    /// The item's position in its history, when a version attribute is configured.
    fn version_of(&self, item: &crate::store::Item) -> Option<Order> {
        let attr = self.settings.version_attribute.as_ref()?;
        match item.get(attr) {
            Some(serde_dynamo::AttributeValue::N(n)) => Order::version(n, false),
            _ => None,
        }
    }
}

/// The after-work of an answer that will not fill: handing back `lease`, if there is one.
fn handing_back(
    lease: Option<impl Future<Output = Result<(), CacheError>> + Send + 'static>,
) -> AfterAnswer {
    let Some(release) = lease else {
        return AfterAnswer::nothing();
    };
    AfterAnswer::run(async move {
        match release.await {
            Ok(()) => {}
            // Its node has just failed several calls: the lease lapses after `LEASE_MS`.
            Err(e @ CacheError::BreakerOpen(_)) => {
                tracing::debug!(error = %e, "lease not handed back")
            }
            Err(e) => tracing::warn!(error = %e, "handing the lease back failed"),
        }
    })
}

/// `failed` fills of one request failed, `e` the first: one line for the request, none when
/// only an open breaker refused them (the breaker logs its opening and closing).
fn log_failed_fills(e: &CacheError, failed: usize, key: &str) {
    match e {
        CacheError::BreakerOpen(_) => tracing::debug!(error = %e, failed, key, "fill not sent"),
        _ => tracing::warn!(error = %e, failed, key, "cache fill failed"),
    }
}

fn lookup_of(cached: String) -> Lookup {
    if cached == NOT_FOUND {
        Lookup::NotFound
    } else {
        Lookup::Found(Document::from_cached(cached))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::memory::MemoryCache;
    use crate::store::memory::MemoryStore;
    use serde_dynamo::AttributeValue;
    use std::sync::atomic::Ordering;

    pub(super) fn read_path() -> ReadPath<MemoryCache, MemoryStore> {
        let store = MemoryStore::default();
        store.items.lock().unwrap().insert(
            "kb-001".into(),
            [
                ("productId".to_owned(), AttributeValue::S("kb-001".into())),
                ("price".to_owned(), AttributeValue::N("129.99".into())),
            ]
            .into(),
        );
        ReadPath::new(MemoryCache::default(), store, CacheSettings::default())
    }

    #[tokio::test]
    async fn miss_fills_then_hits_without_the_store() {
        let rp = read_path();
        let (s1, r1) = rp.get("kb-001").await;
        let (s2, r2) = rp.get("kb-001").await;
        assert_eq!((s1, s2), (CacheStatus::Miss, CacheStatus::Hit));
        let want = Lookup::Found(Document::from_cached(
            r#"{"price":129.99,"productId":"kb-001"}"#.into(),
        ));
        assert_eq!(r1.unwrap(), want);
        assert_eq!(r2.unwrap(), want);
        assert_eq!(rp.store.reads.load(Ordering::SeqCst), 1);
        let entries = rp.cache.entries.lock().unwrap();
        assert_eq!(entries["product:kb-001"].1, CacheSettings::default().ttl);
    }

    #[tokio::test]
    async fn absent_items_are_cached_briefly_as_not_found() {
        let rp = read_path();
        assert_eq!(rp.get("nope").await.1.unwrap(), Lookup::NotFound);
        let (status, r) = rp.get("nope").await;
        assert_eq!((status, r.unwrap()), (CacheStatus::Hit, Lookup::NotFound));
        assert_eq!(rp.store.reads.load(Ordering::SeqCst), 1);
        let entries = rp.cache.entries.lock().unwrap();
        assert_eq!(
            entries["product:nope"],
            (NOT_FOUND.to_owned(), CacheSettings::default().negative_ttl)
        );
    }

    #[tokio::test]
    async fn cache_failure_bypasses_to_the_store() {
        let rp = read_path();
        rp.cache.fail.store(true, Ordering::SeqCst);
        let (status, r) = rp.get("kb-001").await;
        assert_eq!(status, CacheStatus::Bypass);
        assert!(matches!(r.unwrap(), Lookup::Found(_)));
        // One failed read, no fill attempt after it.
        assert_eq!(rp.cache.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_lease_granted_behind_a_timed_out_reply_is_handed_back() {
        // Redis granted the lease, but the reply did not arrive in time.
        let rp = read_path();
        rp.cache.lose_probe_replies.store(true, Ordering::SeqCst);
        let (status, r) = rp.get("kb-001").await;
        assert_eq!(status, CacheStatus::Bypass);
        assert!(matches!(r.unwrap(), Lookup::Found(_)));
        assert!(
            rp.cache.leases.lock().unwrap().is_empty(),
            "the lease was kept"
        );
    }

    #[tokio::test]
    async fn the_lease_hand_back_after_a_lost_probe_reply_rides_in_the_after_work() {
        let rp = read_path();
        rp.cache.lose_probe_replies.store(true, Ordering::SeqCst);
        let (status, r, after) = rp.answer("kb-001").await;
        assert_eq!(status, CacheStatus::Bypass);
        assert!(matches!(r.unwrap(), Lookup::Found(_)));
        assert!(after.is_pending(), "no hand-back left to the after-work");
        // Yield to anything spawned: nothing may hand the lease back behind the after-work.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            rp.cache
                .leases
                .lock()
                .unwrap()
                .contains_key("product:kb-001"),
            "the lease was handed back outside the after-work"
        );
        after.await;
        assert!(
            rp.cache.leases.lock().unwrap().is_empty(),
            "the after-work kept the lease"
        );
    }

    #[tokio::test]
    async fn bad_ids_touch_neither_backend() {
        let rp = read_path();
        for bad in ["", "{kb}", "a\u{0}b"] {
            let (status, r) = rp.get(bad).await;
            assert_eq!(status, CacheStatus::Bypass);
            assert!(matches!(r, Err(ReadError::InvalidId(_))), "{bad:?}");
        }
        assert_eq!(rp.cache.calls.load(Ordering::SeqCst), 0);
        assert_eq!(rp.store.reads.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_after_lease_wait_and_reads_without_filling() {
        let rp = read_path();
        rp.cache
            .leases
            .lock()
            .unwrap()
            .insert("product:kb-001".into(), "someone".into());
        let started = tokio::time::Instant::now();
        let (status, r) = rp.get("kb-001").await;
        assert_eq!(status, CacheStatus::Miss);
        assert!(matches!(r.unwrap(), Lookup::Found(_)));
        assert!(started.elapsed() >= CacheSettings::default().lease_wait);
        assert_eq!(
            rp.cache.value("product:kb-001"),
            None,
            "filled without the lease"
        );
        assert_eq!(rp.cache.leases.lock().unwrap()["product:kb-001"], "someone");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_served_by_the_lease_holders_fill() {
        let rp = read_path();
        rp.cache
            .leases
            .lock()
            .unwrap()
            .insert("product:kb-001".into(), "holder".into());
        let filler = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            rp.cache.leases.lock().unwrap().remove("product:kb-001");
            rp.cache.entries.lock().unwrap().insert(
                "product:kb-001".into(),
                (r#"{"filled":true}"#.into(), Duration::from_secs(1)),
            );
        };
        let ((status, r), ()) = tokio::join!(rp.get("kb-001"), filler);
        assert_eq!(status, CacheStatus::Hit);
        assert_eq!(
            r.unwrap(),
            Lookup::Found(Document::from_cached(r#"{"filled":true}"#.into()))
        );
        assert_eq!(rp.store.reads.load(Ordering::SeqCst), 0);
    }
}
