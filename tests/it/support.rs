//! What every suite needs: one shared moto server, a fresh Redis and table per test, the two
//! handlers wired to them, and counters around the backends.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aws_sdk_dynamodb::types::StreamViewType;
use local_stack::services::{MotoServer, RedisServer};
use local_stack::stream::{lambda_event, Position, StreamReader};
use product_cache::cache::{BatchError, Cache, CacheError, CacheOp, Fill, Probe, RedisCache};
use product_cache::config::{
    AwsTimeouts, CacheSettings, InvalidationMode, InvalidatorSettings, ReadSettings, RedisSettings,
};
use product_cache::id::{KeyType, ProductId};
use product_cache::invalidate::Invalidator;
use product_cache::read::{Answer, ReadPath};
use product_cache::store::{DynamoStore, Item, ManyItems, ProductStore, StoreError};
use serde_json::Value;

/// Test output is quiet unless `TEST_LOG` is set.
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .init();
        }
    });
}

/// The endpoint of the moto server shared by the whole test binary, but for the checker's runs.
pub fn moto_endpoint() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    shared_moto(&ENDPOINT)
}

/// The endpoint of the moto server the checker's runs share. Moto answers one request at a
/// time: a checker run's readers and feeder keep it busy, and behind them the other tests'
/// requests queued past their one-second attempt timeouts (a full CI run, two tests at a time,
/// failed nine tests so).
pub fn checker_moto_endpoint() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    shared_moto(&ENDPOINT)
}

/// A moto server started once into `endpoint`, from a thread that never exits: the child is
/// bound to the life of the thread that spawned it (PDEATHSIG), and each `#[tokio::test]` runs
/// on a thread of its own that ends with the test.
fn shared_moto(endpoint: &'static OnceLock<String>) -> &'static str {
    endpoint.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("moto-owner".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                match rt.block_on(MotoServer::start()) {
                    Ok(server) => {
                        tx.send(Ok(server.endpoint())).unwrap();
                        loop {
                            std::thread::park();
                        }
                    }
                    Err(e) => tx.send(Err(e.to_string())).unwrap(),
                }
            })
            .unwrap();
        rx.recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("moto_server did not start: {e}"))
    })
}

/// `event` with every record stamped as created now. Fixtures carry fixed dates, and a refresh
/// from a record older than the Redis instance is applied as a delete (it could be a replay of
/// changes a restart forgot).
pub fn fresh(mut event: Value) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for record in event["Records"].as_array_mut().into_iter().flatten() {
        if record["dynamodb"].is_object() {
            record["dynamodb"]["ApproximateCreationDateTime"] = serde_json::json!(now);
        }
    }
    event
}

/// `target/debug/<name>` (or `$BINARY_PROFILE`) of this workspace, honouring `CARGO_TARGET_DIR`.
pub fn binary(name: &str) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_DIR").map(PathBuf::from))
        .map(|dir| {
            if dir.is_relative() {
                workspace.join(dir)
            } else {
                dir
            }
        })
        .unwrap_or_else(|| workspace.join("target"));
    // `BINARY_PROFILE=release` runs the suites against release builds, as deployed.
    let profile = std::env::var("BINARY_PROFILE").unwrap_or_else(|_| "debug".into());
    let path = target.join(profile).join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p functions -p pcache --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn fixture(name: &str) -> Value {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// A unique table name per test, so tests can share the moto server.
pub fn unique_table(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Stores `token` as a Redis AUTH secret (`{"token": ...}`) in the local Secrets Manager and
/// returns its ARN.
pub async fn token_secret(token: &str) -> String {
    let sdk = local_stack::table::local_sdk_config(moto_endpoint()).await;
    aws_sdk_secretsmanager::Client::new(&sdk)
        .create_secret()
        .name(unique_table("redis-token"))
        .secret_string(serde_json::json!({ "token": token }).to_string())
        .send()
        .await
        .unwrap()
        .arn
        .unwrap()
}

/// Counts calls into a backend, to prove which requests reach it.
pub struct Counting<T> {
    pub inner: T,
    pub calls: Arc<AtomicUsize>,
}

impl<T> Counting<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            calls: Arc::default(),
        }
    }
    pub fn count(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl<S: ProductStore> ProductStore for Counting<S> {
    fn get(&self, id: &ProductId) -> impl Future<Output = Result<Option<Item>, StoreError>> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.get(id)
    }
    /// One call: a `BatchGetItem`.
    fn get_many(&self, ids: &[ProductId]) -> impl Future<Output = ManyItems> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.get_many(ids)
    }
}

impl<C: Cache> Cache for Counting<C> {
    fn probe(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Probe, CacheError>> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.probe(key, token, lease)
    }
    fn get_many(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Vec<Result<Option<String>, CacheError>>> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.get_many(keys)
    }
    fn probe_many(
        &self,
        keys: &[String],
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = Vec<Result<Probe, CacheError>>> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.probe_many(keys, token, lease)
    }
    fn fill(&self, fill: Fill) -> impl Future<Output = Result<bool, CacheError>> + Send + 'static {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.fill(fill)
    }
    fn apply(
        &self,
        ops: &[CacheOp],
    ) -> impl Future<Output = Result<product_cache::cache::Applied, BatchError>> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.apply(ops)
    }
    fn release(
        &self,
        key: &str,
        token: &str,
    ) -> impl Future<Output = Result<(), CacheError>> + Send + 'static {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.release(key, token)
    }
}

pub type TestReadPath = ReadPath<Counting<RedisCache>, Counting<DynamoStore>>;

/// A Redis of its own and a table of its own on the shared moto server, with both handlers.
pub struct TestEnv {
    pub redis: RedisServer,
    pub table: String,
    pub mode: InvalidationMode,
    pub settings: CacheSettings,
    pub sdk: aws_config::SdkConfig,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub stream: StreamReader,
    pub read: TestReadPath,
    pub invalidator: Invalidator<RedisCache>,
    /// Where the stream has been consumed up to.
    last_sequence: Option<String>,
}

impl TestEnv {
    pub async fn new(mode: InvalidationMode) -> Self {
        Self::with_settings(mode, CacheSettings::default()).await
    }

    pub async fn with_settings(mode: InvalidationMode, settings: CacheSettings) -> Self {
        Self::with_stream_view(mode, settings, StreamViewType::NewAndOldImages).await
    }

    /// [`TestEnv::with_settings`] over a table whose stream carries `view` (`KEYS_ONLY`, ...)
    /// rather than the template's `NEW_AND_OLD_IMAGES`.
    pub async fn with_stream_view(
        mode: InvalidationMode,
        settings: CacheSettings,
        view: StreamViewType,
    ) -> Self {
        init_logging();
        // Same clock for the local stream and Redis: no margin needed.
        let settings = CacheSettings {
            clock_margin: Duration::ZERO,
            ..settings
        };
        let redis = RedisServer::start().await.expect("redis-server starts");
        let sdk = local_stack::table::local_sdk_config(moto_endpoint()).await;
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let table = unique_table("products");
        let stream_arn = local_stack::table::ensure_table_with_stream(
            &dynamodb,
            &table,
            &settings.key_attribute,
            settings.key_type,
            view,
        )
        .await
        .expect("table created");
        let stream = StreamReader::new(aws_sdk_dynamodbstreams::Client::new(&sdk), stream_arn);
        let read_settings =
            ReadSettings::new(RedisSettings::new(redis.url()), &table, settings.clone());
        let read = ReadPath::new(
            Counting::new(redis_cache(&redis.url(), &settings).await),
            Counting::new(DynamoStore::from_settings(&read_settings, &sdk)),
            settings.clone(),
        );
        let invalidator = InvalidatorSettings {
            redis: read_settings.redis,
            mode,
            cache: settings.clone(),
        };
        let invalidator = Invalidator::build(invalidator, &sdk).await.unwrap();
        if mode == InvalidationMode::Refresh {
            // A Redis started empty for this test: refreshes write from the first record on.
            declared_empty(invalidator.cache()).await;
        }
        Self {
            redis,
            table,
            mode,
            settings,
            sdk,
            dynamodb,
            stream,
            read,
            invalidator,
            last_sequence: None,
        }
    }

    /// A client of this environment's Redis, built as the functions build theirs.
    pub async fn cache(&self, settings: &CacheSettings) -> RedisCache {
        redis_cache(&self.redis.url(), settings).await
    }

    /// The table of this environment, read the way the read function reads it.
    pub fn store(&self, settings: &CacheSettings) -> DynamoStore {
        self.store_of(&self.table, settings)
    }

    /// Another table (one that may not exist) on the shared moto server.
    pub fn store_of(&self, table: &str, settings: &CacheSettings) -> DynamoStore {
        dynamo_store(&self.sdk, table, settings)
    }

    /// A plain connection for looking at what is really in Redis.
    pub async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn raw_get(&self, key: &str) -> Option<String> {
        let mut conn = self.redis_conn().await;
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    pub async fn raw_set(&self, key: &str, value: &str) {
        let mut conn = self.redis_conn().await;
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }

    pub async fn raw_del(&self, key: &str) {
        let mut conn = self.redis_conn().await;
        redis::cmd("DEL")
            .arg(key)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }

    /// Starts over from an empty Redis, as the test's own fresh one: FLUSHALL, then (in refresh
    /// mode) the epochs declared again, as at the start.
    pub async fn flush(&self) {
        self.lose_data().await;
        if self.mode == InvalidationMode::Refresh {
            declared_empty(self.invalidator.cache()).await;
        }
    }

    /// FLUSHALL: documents, positions and epochs gone, as in a data loss.
    pub async fn lose_data(&self) {
        let mut conn = self.redis_conn().await;
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }

    pub async fn ttl(&self, key: &str) -> i64 {
        let mut conn = self.redis_conn().await;
        redis::cmd("TTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Puts an item given in DynamoDB JSON (`{"productId": {"S": "x"}, ...}`).
    pub async fn put_json(&self, item: Value) {
        let item: serde_dynamo::Item = serde_json::from_value(item).unwrap();
        let item: std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue> =
            item.into();
        self.dynamodb
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .unwrap();
    }

    pub async fn put_product(&self, id: &str, price: &str) {
        self.put_json(serde_json::json!({
            "productId": {"S": id},
            "name": {"S": format!("Product {id}")},
            "price": {"N": price},
        }))
        .await;
    }

    pub async fn delete_product(&self, id: &str) {
        self.dynamodb
            .delete_item()
            .table_name(&self.table)
            .key(
                &self.settings.key_attribute,
                aws_sdk_dynamodb::types::AttributeValue::S(id.into()),
            )
            .send()
            .await
            .unwrap();
    }

    /// Reads the stream records written since the last call, as the event Lambda would deliver.
    pub async fn new_stream_event(&mut self) -> Value {
        let position = match &self.last_sequence {
            Some(seq) => Position::After(seq.clone()),
            None => Position::TrimHorizon,
        };
        let records = self.stream.read_available(&position).await.unwrap();
        if let Some(last) = records.last() {
            self.last_sequence = last["dynamodb"]["SequenceNumber"]
                .as_str()
                .map(str::to_owned);
        }
        lambda_event(records)
    }

    /// Feeds the stream's new records to the invalidator, asserting that nothing failed.
    pub async fn drain_stream(&mut self) -> usize {
        self.drain_stream_returning().await["Records"]
            .as_array()
            .unwrap()
            .len()
    }

    /// [`TestEnv::drain_stream`], answering the event the invalidator was given.
    pub async fn drain_stream_returning(&mut self) -> Value {
        let event = self.new_stream_event().await;
        let response = self.invalidator.handle(event.clone()).await;
        assert!(
            response.batch_item_failures.is_empty(),
            "invalidator reported failures: {response:?}"
        );
        event
    }

    /// GET /products/{id} through the HTTP edge: (status, X-Cache, body).
    pub async fn http_get(&self, id: &str) -> (u16, String, Value) {
        http_get(&self.read, &format!("/products/{id}")).await
    }
}

/// A numeric field of an `INFO` section (`evicted_keys` of `stats`, `used_memory` of
/// `memory`, ...); `None` when the node does not answer or has no such field.
pub async fn info_field(
    conn: &mut impl redis::aio::ConnectionLike,
    section: &str,
    field: &str,
) -> Option<u64> {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|n| n.trim().parse().ok())
}

/// Calls of `command` the node on `port` has served, scripts' calls included (`INFO
/// commandstats`).
pub async fn command_calls(port: u16, command: &str) -> u64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=") as &str))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// A single Redis node at `url`, built the way the functions build their client (with the
/// test's guards, which only the `test-support` feature lets a test switch off).
pub async fn redis_cache(url: &str, settings: &CacheSettings) -> RedisCache {
    cache_with(&RedisSettings::new(url), settings).await
}

/// The functions' Redis client over `redis` (a cluster, confirmation, the breaker, ...), built
/// the way they build it.
/// Declares `cache` empty (every slot's epoch written: refreshes write from the first record
/// on), as a test's setup. One call writes 16,384 epoch keys within the cache's timeout; on a
/// loaded machine it can outlast it (seen in a clean-clone CI run beside other builds), and it
/// is idempotent, so it is tried again until it lands, for up to 30 s.
pub async fn declared_empty(cache: &RedisCache) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match cache.declare_empty().await {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!("declare_empty failed, trying again: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("declare_empty failed for 30 s: {e}"),
        }
    }
}

pub async fn cache_with(redis: &RedisSettings, settings: &CacheSettings) -> RedisCache {
    let sdk = local_stack::table::local_sdk_config(moto_endpoint()).await;
    RedisCache::from_settings(redis, settings, &sdk)
        .await
        .expect("valid Redis settings")
}

/// `table` read the way the read function reads it (strongly consistent).
pub fn dynamo_store(
    sdk: &aws_config::SdkConfig,
    table: &str,
    settings: &CacheSettings,
) -> DynamoStore {
    dynamo_store_with(sdk, table, settings, AwsTimeouts::default())
}

/// [`dynamo_store`] with `table_timeouts` bounding each `GetItem` and `BatchGetItem`.
pub fn dynamo_store_with(
    sdk: &aws_config::SdkConfig,
    table: &str,
    settings: &CacheSettings,
    table_timeouts: AwsTimeouts,
) -> DynamoStore {
    // The Redis URL is no part of a store; the read settings just carry one.
    let read = ReadSettings {
        table_timeouts,
        ..ReadSettings::new(RedisSettings::new(""), table, settings.clone())
    };
    DynamoStore::from_settings(&read, sdk)
}

pub async fn http_get<C: Cache, S: ProductStore>(
    read: &ReadPath<C, S>,
    path: &str,
) -> (u16, String, Value) {
    unpack(Answer::get(read, path).await)
}

pub async fn respond<C: Cache, S: ProductStore>(
    read: &ReadPath<C, S>,
    req: lambda_http::Request,
) -> (u16, String, Value) {
    let response = product_cache::read::handle_request(read, req)
        .await
        .unwrap();
    unpack(Answer::of(&response))
}

/// (status, X-Cache, JSON body), after checking that the body is JSON.
fn unpack(answer: Answer) -> (u16, String, Value) {
    assert_eq!(answer.content_type, "application/json");
    let body = serde_json::from_str(&answer.body).expect("body is JSON");
    (answer.status, answer.x_cache, body)
}

pub fn key_type_n() -> CacheSettings {
    CacheSettings {
        key_type: KeyType::N,
        ..CacheSettings::default()
    }
}

/// Writes a CA (`ca.crt`) and a server certificate (`server.crt`, `server.key`) whose subject
/// alternative names are `san` (e.g. `DNS:localhost`) into `dir`, with the openssl CLI.
pub fn make_certificates(dir: &Path, san: &str) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/setup.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=local test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=local test server",
    ]);
    std::fs::write(dir.join("ext.cnf"), format!("subjectAltName={san}\n")).unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
}

/// Both functions over `redis`, as the Lambda builds them (default cache settings), reading
/// `env`'s table.
pub async fn both_functions(
    env: &TestEnv,
    redis: RedisSettings,
    mode: InvalidationMode,
) -> (ReadPath<RedisCache, DynamoStore>, Invalidator<RedisCache>) {
    let settings = CacheSettings::default();
    let read = ReadSettings::new(redis.clone(), &env.table, settings.clone());
    let read = ReadPath::build(read, &env.sdk).await.unwrap();
    let invalidator = InvalidatorSettings {
        redis,
        mode,
        cache: settings,
    };
    let invalidator = Invalidator::build(invalidator, &env.sdk).await.unwrap();
    (read, invalidator)
}

/// Until both have connected (which they do in the background, bounded by the connect budget):
/// the read has filled and hit, the batch has been applied, and the read has filled again.
pub async fn connected<C, S, I>(
    read: &ReadPath<C, S>,
    invalidator: &Invalidator<I>,
    event: &serde_json::Value,
) where
    C: product_cache::cache::Cache,
    S: product_cache::store::ProductStore,
    I: product_cache::cache::Cache,
{
    for attempt in 0.. {
        assert!(attempt < 100, "never connected");
        if read.get("kb-001").await.0 == product_cache::read::CacheStatus::Hit {
            break;
        }
    }
    for attempt in 0.. {
        assert!(attempt < 100, "never connected");
        if invalidator
            .handle(event.clone())
            .await
            .batch_item_failures
            .is_empty()
        {
            break;
        }
    }
    assert_eq!(
        read.get("kb-001").await.0,
        product_cache::read::CacheStatus::Miss
    );
}

/// Waits (bounded) until `replica` reports its link to the primary up.
pub async fn linked(replica: &RedisServer) {
    let client = redis::Client::open(replica.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..100 {
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.unwrap();
        let state = role
            .get(3)
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok());
        if state.as_deref() == Some("connected") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the replica never connected");
}

/// A replica of the Redis on `primary`, replicating through `via` (the primary's own port, or
/// a proxy's in front of it whose stream a test can hold), once its link is up.
pub async fn replica_of_port(primary: u16, via: u16) -> RedisServer {
    // A replica's first sync waits 5 s by default, for more replicas to share it.
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{primary}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("CONFIG")
        .arg(&["SET", "repl-diskless-sync-delay", "0"][..])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let via = via.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &via])
        .await
        .unwrap();
    linked(&replica).await;
    replica
}

/// `count` product ids whose cache keys (`product:<id>`) share one hash slot, found by brute
/// force over the 100 million ids `s00000000`..`s99999999` without hashing each: CRC-16/XMODEM
/// has no initial value nor final XOR, so over keys of one length a key's slot is the XOR of
/// what each byte contributes at its place (the slot of that byte alone among NULs). The ids
/// found are checked with `slot_of` itself.
pub fn ids_in_one_slot(count: usize) -> Vec<String> {
    let key = |n: usize| format!("product:s{n:08}");
    let len = key(0).len();
    let alone = |at: usize, byte: u8| {
        let mut bytes = vec![0u8; len];
        bytes[at] = byte;
        product_cache::cache::slots::slot_of(std::str::from_utf8(&bytes).unwrap())
    };
    let of = |at: usize, text: &str| {
        text.bytes()
            .enumerate()
            .fold(0, |slot, (i, b)| slot ^ alone(at + i, b))
    };
    let fixed = of(0, "product:s");
    let (high_at, low_at) = (len - 8, len - 4);
    let mut by_low: std::collections::HashMap<u16, Vec<usize>> = std::collections::HashMap::new();
    for low in 0..10_000 {
        by_low
            .entry(of(low_at, &format!("{low:04}")))
            .or_default()
            .push(low);
    }
    let slot = product_cache::cache::slots::slot_of(&key(0));
    let mut ids = Vec::new();
    for high in 0..10_000 {
        let want = slot ^ fixed ^ of(high_at, &format!("{high:04}"));
        for low in by_low.get(&want).into_iter().flatten() {
            ids.push(format!("s{high:04}{low:04}"));
        }
        if ids.len() >= count {
            break;
        }
    }
    ids.truncate(count);
    assert_eq!(ids.len(), count);
    for id in &ids {
        assert_eq!(
            product_cache::cache::slots::slot_of(&format!("product:{id}")),
            slot,
            "{id}"
        );
    }
    ids
}

/// Hands `event` to the invalidator as Lambda does with `ReportBatchItemFailures`: a batch
/// reporting a failed record is delivered again from that record on (a call can outlast the
/// 100 ms timeout on a loaded machine); every record must be applied within 20 deliveries.
pub async fn applied(invalidator: &Invalidator<RedisCache>, event: Value) {
    let mut rest = event["Records"].as_array().unwrap().clone();
    for attempt in 1.. {
        let response = invalidator
            .handle(serde_json::json!({ "Records": rest }))
            .await;
        let Some(failed) = response.batch_item_failures.first() else {
            return;
        };
        assert!(attempt < 20, "a batch failed 20 times: {response:?}");
        let from = rest
            .iter()
            .position(|r| {
                r["dynamodb"]["SequenceNumber"].as_str() == failed.item_identifier.as_deref()
            })
            .expect("the failed record is one of the batch's");
        rest.drain(..from);
    }
}
