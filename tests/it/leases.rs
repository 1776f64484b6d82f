//! Leases against real servers (redis-server, moto): a probe whose reply was lost (its
//! connection cut after Redis ran it), a batch that takes a lapsed lease over while it waits, a
//! lease as long as the table call it guards, and what a request that waited or failed its
//! fills reports (one `LeaseWaits` per request, one log line for its failed fills).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use local_stack::proxy::DelayProxy;
use product_cache::cache::{lease_key, Cache, Fill, Probe, RedisCache};
use product_cache::config::{CacheSettings, InvalidationMode::Delete, ReadSettings};
use product_cache::id::KeyType;
use product_cache::metrics::{MetricsSettings, Sink};
use product_cache::read::{BatchIds, CacheStatus, Lookup, ReadPath};
use product_cache::store::DynamoStore;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::metrics::{emf_of, total};
use crate::support::{dynamo_store, moto_endpoint, redis_cache, TestEnv};

/// Bound on anything that must happen: generous for a loaded two-core machine.
const WITHIN: Duration = Duration::from_secs(10);

fn batch(ids: &[&str]) -> BatchIds {
    BatchIds::parse(Some(&format!("ids={}", ids.join(","))), KeyType::S).unwrap()
}

/// The cached document's price, if the key holds a document.
async fn cached_price(env: &TestEnv, id: &str) -> Option<serde_json::Value> {
    let cached = env.raw_get(&format!("product:{id}")).await?;
    Some(serde_json::from_str::<serde_json::Value>(&cached).unwrap()["price"].clone())
}

/// A metric summed over the lines `lines` holds.
fn metric(lines: &Mutex<Vec<String>>, name: &str) -> f64 {
    total(&emf_of(lines), name)
}

/// A TCP proxy in front of a Redis that loses the replies of the next [`cut`](Self::cut)
/// probe scripts: a client chunk carrying `EVALSHA` is passed on (so Redis runs it), and when
/// Redis's reply comes back, the connection is closed on both sides instead. The client sees
/// its connection die with its request sent and unanswered, as when a network path or the
/// server's side of the connection fails right after the server ran it.
struct CuttingProxy {
    port: u16,
    /// Replies still to lose.
    cuts: Arc<AtomicUsize>,
    /// How long each new connection is held before it is passed on (ms).
    stall_ms: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let stall_ms = Arc::new(AtomicUsize::new(0));
        let (shared, stall) = (cuts.clone(), stall_ms.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cuts = shared.clone();
                let stall = Duration::from_millis(stall.load(Ordering::SeqCst) as u64);
                tokio::spawn(async move {
                    tokio::time::sleep(stall).await;
                    if let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        relay(client, server, &cuts).await;
                    }
                });
            }
        });
        Self {
            port,
            cuts,
            stall_ms,
            task,
        }
    }

    /// Holds every connection accepted from now on for `stall` before passing it on, as a slow
    /// TLS handshake and AUTH would.
    fn stall_new_connections(&self, stall: Duration) {
        self.stall_ms
            .store(stall.as_millis() as usize, Ordering::SeqCst);
    }

    /// Loses the replies of the next `n` requests that call a script.
    fn cut(&self, n: usize) {
        self.cuts.store(n, Ordering::SeqCst);
    }

    /// Cuts still to make.
    fn cuts_left(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Passes bytes both ways until either side closes, or until the reply to a request chosen
/// for a cut arrives: then both sides are dropped, that reply unsent.
async fn relay(
    mut client: tokio::net::TcpStream,
    mut server: tokio::net::TcpStream,
    cuts: &AtomicUsize,
) {
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    // A request went out whose reply is to be lost.
    let mut muted = false;
    loop {
        tokio::select! {
            read = from_client.read(&mut up) => {
                let Ok(n @ 1..) = read else { return };
                let chunk = &up[..n];
                if !muted
                    && chunk.windows(7).any(|w| w == b"EVALSHA")
                    && cuts
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                {
                    muted = true;
                }
                if to_server.write_all(chunk).await.is_err() {
                    return;
                }
            }
            read = from_server.read(&mut down) => {
                let Ok(n @ 1..) = read else { return };
                // Redis has answered, so it ran the script: the reply is lost with the
                // connection.
                if muted || to_client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A read path over `env`'s table and a Redis reached at `url`, with `settings`.
async fn read_path(
    env: &TestEnv,
    url: &str,
    settings: &CacheSettings,
) -> ReadPath<RedisCache, DynamoStore> {
    ReadPath::new(
        redis_cache(url, settings).await,
        env.store(settings),
        settings.clone(),
    )
}

/// A batch's probe whose reply was lost with its connection is sent again on a new one (it is
/// safe to repeat), and the second run finds the lease the first took, under the batch's own
/// token: the batch takes it as its own, reads the table and fills at once. A probe that took
/// its own lease for someone else's would wait out `LEASE_WAIT_MS`, answer without a fill and
/// leave the lease held until it lapsed, so that every reader of the key waited too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_probe_does_not_wait_on_its_own_lease() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    env.put_product("kb-warm", "1").await;
    let proxy = CuttingProxy::start(env.redis.port()).await;
    let settings = CacheSettings {
        // Long enough that waiting it out cannot pass for a quick answer, and a lease left
        // behind is still held when the test looks.
        lease: Duration::from_secs(20),
        lease_wait: Duration::from_secs(5),
        // The resend forms a new connection and loads the scripts on it within the call's
        // budget: a generous one, so a loaded machine does not turn the resend into a bypass.
        redis_timeout: Duration::from_secs(1),
        ..CacheSettings::default()
    };
    let read = read_path(&env, &proxy.url(), &settings).await;
    // Connected and the probe script loaded, so that the cut request is the probe itself (not
    // one answered NOSCRIPT, which never ran).
    let warm = read.get_many(&batch(&["kb-warm"])).await;
    assert_eq!(warm.count(CacheStatus::Miss), 1, "{warm:?}");

    proxy.cut(1);
    let started = Instant::now();
    let answer = read.get_many(&batch(&["kb-001"])).await;
    let took = started.elapsed();
    assert_eq!(proxy.cuts_left(), 0, "the probe's reply was not cut");
    let entry = &answer.entries[0];
    assert_eq!(entry.status, CacheStatus::Miss, "{answer:?}");
    assert!(
        matches!(&entry.result, Ok(Lookup::Found(doc)) if doc.as_str().contains("129.99")),
        "{answer:?}"
    );
    // The lease was the batch's: filled, and handed over by the fill.
    assert_eq!(
        cached_price(&env, "kb-001").await,
        Some(json!(129.99)),
        "the resent probe did not take its own lease (answered in {took:?})"
    );
    assert_eq!(
        env.raw_get(&lease_key("product:kb-001")).await,
        None,
        "a lease was left behind"
    );
    assert!(
        took < settings.lease_wait / 2,
        "the batch waited on its own lease: {took:?}"
    );
    let again = read.get_many(&batch(&["kb-001"])).await;
    assert_eq!(again.count(CacheStatus::Hit), 1, "{again:?}");
}

/// A single read's probe whose reply was lost twice (the connection cut, then the resend's
/// too) bypasses the cache, and hands back the lease its probe took: the lease is gone after
/// the read, and the next reader takes it at once and fills. Had only a timeout counted as a
/// probe that may have run, the lease would stay held for `LEASE_MS`, and the next readers
/// would wait `LEASE_WAIT_MS` each and answer without filling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_whose_reply_was_lost_hands_its_lease_back() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    env.put_product("kb-warm", "1").await;
    let proxy = CuttingProxy::start(env.redis.port()).await;
    let settings = CacheSettings {
        lease: Duration::from_secs(20),
        lease_wait: Duration::from_secs(5),
        redis_timeout: Duration::from_secs(1),
        ..CacheSettings::default()
    };
    let read = read_path(&env, &proxy.url(), &settings).await;
    // Connected and the scripts loaded (probe, fill), so the cuts fall on the probe itself.
    assert_eq!(read.get("kb-warm").await.0, CacheStatus::Miss);

    // The probe's reply is lost, and so is its resend's on the new connection.
    proxy.cut(2);
    let (status, result) = read.get("kb-001").await;
    assert_eq!(proxy.cuts_left(), 0, "the probe was not cut twice");
    assert_eq!(status, CacheStatus::Bypass);
    assert!(matches!(result, Ok(Lookup::Found(_))), "{result:?}");
    assert_eq!(
        env.raw_get(&lease_key("product:kb-001")).await,
        None,
        "the lease the lost probe took was kept"
    );
    assert_eq!(
        cached_price(&env, "kb-001").await,
        None,
        "filled on a bypass"
    );

    // The next reader takes the lease at once and fills.
    let started = Instant::now();
    let (status, result) = read.get("kb-001").await;
    assert_eq!(status, CacheStatus::Miss);
    assert!(result.is_ok());
    assert_eq!(cached_price(&env, "kb-001").await, Some(json!(129.99)));
    assert!(
        started.elapsed() < settings.lease_wait / 2,
        "the next reader waited for the lease: {:?}",
        started.elapsed()
    );
}

/// A single read's probe whose reply was lost with its connection, and whose resend could not
/// go out because the new connection was still forming when the read's budget ran out, may
/// still have taken the lease: the read hands it back (over the connection, formed by then),
/// as after a timeout. Reported as "still connecting", which says nothing was sent, the lease
/// stayed held for `LEASE_MS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_lost_while_its_connection_re_forms_hands_its_lease_back() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    env.put_product("kb-warm", "1").await;
    let proxy = CuttingProxy::start(env.redis.port()).await;
    let settings = CacheSettings {
        lease: Duration::from_secs(20),
        lease_wait: Duration::from_secs(5),
        redis_timeout: Duration::from_secs(1),
        ..CacheSettings::default()
    };
    let read = read_path(&env, &proxy.url(), &settings).await;
    assert_eq!(read.get("kb-warm").await.0, CacheStatus::Miss);

    // The probe's reply is lost; the new connection takes 1.5 s to form: past the read's 1 s,
    // within the hand-back's own second after the answer.
    proxy.stall_new_connections(Duration::from_millis(1500));
    proxy.cut(1);
    let (status, result) = read.get("kb-001").await;
    assert_eq!(proxy.cuts_left(), 0, "the probe was not cut");
    assert_eq!(status, CacheStatus::Bypass);
    assert!(matches!(result, Ok(Lookup::Found(_))), "{result:?}");
    assert_eq!(
        env.raw_get(&lease_key("product:kb-001")).await,
        None,
        "the lease the lost probe took was kept"
    );
}

/// A batch waiting for other readers' fills takes over a lease whose holder died once it
/// lapses, and reads and fills that key at once, while it goes on waiting for the others: the
/// fill lands within its lease. Kept through the rest of the wait instead, the taken-over lease
/// would lapse before its fill, which Redis would then refuse, leaving the key uncached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_waits_holds_no_lease_it_cannot_serve_at_once() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-a", "1.5").await;
    env.put_product("kb-b", "2.5").await;
    // A lease taken over when A's holder's lapses (a lease in, give or take the waiting
    // probes' 50 ms backoff) and kept to the end of the wait (two and a half leases in) has
    // lapsed by then. Two seconds leave the fill at once plenty of time on a loaded machine,
    // and so does a generous Redis timeout.
    let lease = Duration::from_secs(2);
    let settings = CacheSettings {
        lease,
        lease_wait: lease * 5 / 2,
        redis_timeout: Duration::from_secs(1),
        ..CacheSettings::default()
    };
    let lines = Arc::new(Mutex::new(Vec::new()));
    let read = read_path(&env, &env.redis.url(), &settings)
        .await
        .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));
    // Two readers that took the leases and died: A's lapses after `lease`, B's outlasts the
    // batch's wait.
    let dead = env.cache(&settings).await;
    for (key, lease) in [
        ("product:kb-a", lease),
        ("product:kb-b", Duration::from_secs(30)),
    ] {
        let probe = dead.probe(key, "dead-holder", lease).await;
        assert_eq!(probe.unwrap(), Probe::Lease, "{key}");
    }

    let (answer, after) = read.answer_many(&batch(&["kb-a", "kb-b"])).await;
    let statuses: Vec<_> = answer.entries.iter().map(|e| e.status).collect();
    assert_eq!(
        statuses,
        [CacheStatus::Miss, CacheStatus::Miss],
        "{answer:?}"
    );
    assert!(
        answer.entries.iter().all(|e| e.result.is_ok()),
        "{answer:?}"
    );
    // A was filled while the batch waited for B, before the answer.
    let a_at_answer = cached_price(&env, "kb-a").await;
    after.await;
    read.metrics().flush();
    assert_eq!(
        a_at_answer,
        Some(json!(1.5)),
        "the taken-over lease was not filled at once: {:?}",
        lines.lock().unwrap()
    );
    assert_eq!(cached_price(&env, "kb-a").await, Some(json!(1.5)));
    // B's holder keeps its lease: the batch read B without filling it.
    assert_eq!(cached_price(&env, "kb-b").await, None);
    assert_eq!(metric(&lines, "BatchReads"), 1.0);
    assert_eq!(metric(&lines, "RefusedFills"), 0.0);
}

/// With the default settings, a lease outlasts the table call it guards: a `GetItem` whose
/// first attempt never answers (timed out after `DYNAMODB_ATTEMPT_TIMEOUT_MS`, a second), and
/// is retried, still fills. With a one-second lease, the fill came after the lease had lapsed
/// and was refused, and the next reader read the table again. `ReadSettings` refuses a lease
/// shorter than the table call and the fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_outlasts_its_holders_bounded_table_call() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let moto = moto_endpoint()
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("moto endpoint {}", moto_endpoint()));
    let proxy = DelayProxy::start(moto, Duration::ZERO).await.unwrap();
    // The first connection is accepted and never answered: the first attempt times out.
    proxy.swallow_connections(1);
    let sdk = local_stack::table::local_sdk_config(&format!("http://{}", proxy.addr())).await;
    let settings = CacheSettings::default();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let read = ReadPath::new(
        env.cache(&settings).await,
        dynamo_store(&sdk, &env.table, &settings),
        settings.clone(),
    )
    .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));

    let started = Instant::now();
    let (status, result) = tokio::time::timeout(WITHIN, read.get("kb-001"))
        .await
        .expect("the read did not answer");
    let took = started.elapsed();
    assert_eq!(status, CacheStatus::Miss);
    assert!(matches!(result, Ok(Lookup::Found(_))), "{result:?}");
    assert_eq!(proxy.swallowed().len(), 1, "the first attempt was not held");
    assert!(
        took > Duration::from_secs(1),
        "the table call took {took:?}"
    );
    assert_eq!(
        cached_price(&env, "kb-001").await,
        Some(json!(129.99)),
        "the fill after a {took:?} table call was refused"
    );
    read.metrics().flush();
    assert_eq!(metric(&lines, "Misses"), 1.0);
    assert_eq!(metric(&lines, "RefusedFills"), 0.0);

    // The rule: the lease covers DYNAMODB_TIMEOUT_MS and REDIS_TIMEOUT_MS.
    let required = [("REDIS_URL", "redis://h:6379"), ("TABLE_NAME", "Products")];
    let defaults = ReadSettings::from_source(&required[..]).expect("the defaults are valid");
    assert!(
        defaults.cache.lease >= defaults.table_timeouts.operation + defaults.cache.redis_timeout
    );
    let short = [required[0], required[1], ("LEASE_MS", "1000")];
    let refused = ReadSettings::from_source(&short[..])
        .unwrap_err()
        .to_string();
    assert!(refused.contains("LEASE_MS"), "{refused}");
}

/// `LeaseWaits` counts requests that waited for another reader's fill, whatever their number
/// of products: a batch of three products, each leased by another reader who then fills it,
/// counts one, as a single read that waited does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_waits_counts_requests() {
    let env = TestEnv::new(Delete).await;
    // Generous bounds, so that a loaded machine does not fail the holders' fills nor end the
    // batch's wait before they land (neither is what is counted).
    let settings = CacheSettings {
        redis_timeout: Duration::from_secs(1),
        lease_wait: WITHIN / 2,
        ..CacheSettings::default()
    };
    let lines = Arc::new(Mutex::new(Vec::new()));
    let read = read_path(&env, &env.redis.url(), &settings)
        .await
        .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));
    let ids = ["kb-1", "kb-2", "kb-3"];
    let keys: Vec<String> = ids.iter().map(|id| format!("product:{id}")).collect();
    // Three readers hold the leases.
    let holders = env.cache(&settings).await;
    for key in &keys {
        let probe = holders
            .probe(key, &format!("holder-{key}"), settings.lease)
            .await;
        assert_eq!(probe.unwrap(), Probe::Lease);
    }
    let probes_before = crate::support::command_calls(env.redis.port(), "evalsha").await;

    let fillers = async {
        // The holders fill once the batch has probed the three keys and found them leased
        // (its probes are the only script calls meanwhile).
        let started = Instant::now();
        while crate::support::command_calls(env.redis.port(), "evalsha").await < probes_before + 3 {
            assert!(started.elapsed() < WITHIN, "the batch never probed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for (id, key) in ids.iter().zip(&keys) {
            let fill = Fill {
                key: key.clone(),
                token: format!("holder-{key}"),
                value: json!({"productId": id, "price": 3}).to_string(),
                ttl: settings.ttl,
                order: None,
            };
            assert!(
                holders.fill(fill).await.unwrap(),
                "the holder's fill was refused"
            );
        }
    };
    let ids = batch(&ids);
    let (answer, ()) = tokio::join!(read.get_many(&ids), fillers);
    assert_eq!(answer.count(CacheStatus::Hit), 3, "{answer:?}");
    read.metrics().flush();
    assert_eq!(metric(&lines, "BatchReads"), 1.0);
    assert_eq!(
        metric(&lines, "LeaseWaits"),
        1.0,
        "not one wait for the request"
    );
}

/// Log lines written through a `tracing` subscriber, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A request whose fills all fail (its node stalled between the answer and the fills) logs
/// one warning for them, with their number, not one or two per product: a batch of fifty
/// misses on a stalled node would otherwise write a hundred lines per request, at the moment
/// the logs are read to find out what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_failed_fills_log_one_line() {
    use std::future::IntoFuture as _;
    use tracing::instrument::WithSubscriber as _;

    let env = TestEnv::new(Delete).await;
    let settings = CacheSettings::default();
    let read = read_path(&env, &env.redis.url(), &settings).await;
    // Products the table does not have: each is a miss filled with "not found".
    let ids: Vec<String> = (0..50).map(|i| format!("kb-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (answer, after) = read.answer_many(&batch(&ids)).await;
    assert_eq!(answer.count(CacheStatus::Miss), 50, "{answer:?}");
    assert!(after.is_pending());

    // The node stops answering before the fills go out: each times out, and the hand-backs of
    // their leases fail too (most are refused by the breaker the timeouts opened).
    env.redis.stall();
    struct Resume<'a>(&'a TestEnv);
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            self.0.redis.resume();
        }
    }
    let stalled = Resume(&env);
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // The subscriber is this future's, on whichever thread polls it: the fills run inside it.
    tokio::time::timeout(WITHIN, after.into_future().with_subscriber(subscriber))
        .await
        .expect("the fills did not end");
    drop(stalled);

    let lines = captured.lines();
    let about_fills: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("WARN") && (l.contains("fill") || l.contains("lease")))
        .collect();
    assert_eq!(about_fills.len(), 1, "{lines:#?}");
    assert!(about_fills[0].contains("failed=50"), "{lines:#?}");
}
