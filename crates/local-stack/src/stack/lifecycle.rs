//! Starting and stopping the stack: the wiring of every part into one running system, waiting
//! for it to stop or fail, and the orderly shutdown that leaves no child behind.
//!
//! Everything here wires existing pieces together: the read path and the invalidator are the
//! ones the Lambda functions run ([`product_cache`]), the stream is read by
//! [`crate::poller::Poller`], and the children are [`crate::services`]' processes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use product_cache::config::{
    ConfigError, Function, InvalidationMode, InvalidatorSettings, Layers, ReadSettings,
    RedisSettings, Source,
};
use product_cache::id::KeyType;
use product_cache::inspect::{InspectSettings, Inspector};
use product_cache::invalidate::Invalidator;
use product_cache::metrics::{MetricsSettings, Sink};
use product_cache::read::ReadPath;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{FunctionVariables, StatusStyle};
use crate::error::chain;
use crate::http::HttpStats;
use crate::poller::{EsmConfig, Poller, PollerStats, StartingPosition};
use crate::services::{MotoServer, RedisServer, ServiceError};
use crate::stream::StreamReader;

/// Where the HTTP API listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";
/// The table's name unless told otherwise.
pub const DEFAULT_TABLE: &str = "Products";
/// How often an idle shard is polled locally. Lambda polls four times a second; polling faster
/// here makes a price change visible well under a second, and a local emulator can take it.
pub const LOCAL_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long start-up waits for the invalidator to work through the seeded catalog's stream
/// records before serving anyway (a slow machine still gets a running stack, with a warning).
const CATCH_UP_WITHIN: Duration = Duration::from_secs(60);
/// How often an owned child's port is checked.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// How long shutdown lets in-flight HTTP requests finish.
const DRAIN_HTTP_WITHIN: Duration = Duration::from_secs(5);
/// How long shutdown waits for the poller to notice; it can be inside a retry loop against a
/// Redis that is gone, so after this it is cancelled.
const STOP_POLLER_WITHIN: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("cannot listen on {addr} (pass --listen 127.0.0.1:0 for any free port)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Table(#[from] crate::table::TableError),
    #[error(transparent)]
    Seed(#[from] crate::seed::SeedError),
    #[error("cannot use Redis at {url}")]
    Redis {
        url: String,
        #[source]
        source: product_cache::StartupError,
    },
    #[error("opening the metrics file {path}")]
    MetricsFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating {path}")]
    OnFailureDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the local stack's catalog has string ids; unset KEY_TYPE=N to run it")]
    NumberKeys,
    /// A variable the functions would refuse to start with.
    #[error(transparent)]
    Settings(#[from] ConfigError),
    /// A child process, the HTTP server or the poller stopped while the stack was running.
    #[error("{0}")]
    Failed(String),
}

/// Opens (appending, created with its folder if missing) the file the metrics go to.
fn metrics_file(path: &Path) -> Result<Sink, StackError> {
    let error = |source| StackError::MetricsFile {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(error)?;
    Ok(Sink::File(Arc::new(std::sync::Mutex::new(file))))
}

/// What to run and where.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Port 0 picks a free port; [`Stack::http_addr`] tells which.
    pub listen: SocketAddr,
    pub table: String,
    /// A running Redis to use; `None` starts a `redis-server` child.
    pub redis_url: Option<String>,
    /// A running cache to use, with how the functions connect to it (a cluster, TLS, IAM: a
    /// serverless cache, say), in place of `redis_url`; `None`: `redis_url` (or the child) is
    /// one node, connected to as `RedisSettings::new` does.
    pub redis_settings: Option<RedisSettings>,
    /// A running DynamoDB (with Streams) to use; `None` starts a `moto_server` child.
    pub dynamodb_endpoint: Option<String>,
    /// Products written to the table when it is empty; 0 writes none.
    pub seed_products: usize,
    /// The event source mapping's settings; `on_failure` is where given-up records are written.
    pub esm: EsmConfig,
    /// Where `esm` came from, for the start-up message.
    pub esm_source: String,
    /// The invalidator's mode, over `variables`' `INVALIDATION_MODE`.
    pub mode: InvalidationMode,
    /// The variables each function runs with (see [`FunctionVariables`]); empty, the defaults.
    /// The cache's connection and the table's name are the stack's, whatever they say.
    pub variables: FunctionVariables,
    /// Where both functions' metrics are appended (CloudWatch EMF lines, as the functions
    /// print them on Lambda); `None` keeps them to the status line.
    pub metrics: Option<PathBuf>,
    /// The change monitor's mapping (the inspector as the stream's second reader, as
    /// `ChangeMonitorMapping` in the template); `None` runs none.
    pub change_monitor: Option<EsmConfig>,
}

/// The change monitor's mapping as the template deploys it (`ChangeMonitorMapping`): from
/// LATEST, up to 1,000 records a 10 s window, two retries, records older than an hour skipped,
/// no item failures reported (it never fails a batch).
pub fn change_monitor_esm() -> EsmConfig {
    EsmConfig {
        batch_size: 1000,
        batching_window: Duration::from_secs(10),
        bisect_on_error: false,
        max_retry_attempts: Some(2),
        max_record_age: Some(Duration::from_secs(3600)),
        starting_position: StartingPosition::Latest,
        report_batch_item_failures: false,
        on_failure: None,
        poll_interval: LOCAL_POLL_INTERVAL,
    }
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("a valid address"),
            table: DEFAULT_TABLE.into(),
            redis_url: None,
            redis_settings: None,
            dynamodb_endpoint: None,
            seed_products: crate::seed::DEFAULT_PRODUCTS,
            esm: EsmConfig {
                poll_interval: LOCAL_POLL_INTERVAL,
                ..EsmConfig::default()
            },
            esm_source: "Lambda's defaults".into(),
            mode: InvalidationMode::Delete,
            variables: FunctionVariables::default(),
            metrics: None,
            change_monitor: Some(change_monitor_esm()),
        }
    }
}

/// A running stack. Stop it with [`Stack::shutdown`]; dropping it instead stops the tasks and
/// kills the children without waiting for them.
pub struct Stack {
    http_addr: SocketAddr,
    // `pub(super)`: the status display and the state file read these.
    pub(super) redis_url: String,
    pub(super) dynamodb_endpoint: String,
    pub(super) table: String,
    pub(super) key_attribute: String,
    pub(super) seeded: usize,
    pub(super) options: StackOptions,
    pub(super) http_stats: Arc<HttpStats>,
    pub(super) poller_stats: Arc<PollerStats>,
    shutdown: watch::Sender<bool>,
    failures: mpsc::UnboundedReceiver<String>,
    // Keeps `failures` open even when every task has ended.
    _failures_tx: mpsc::UnboundedSender<String>,
    server: Option<JoinHandle<()>>,
    poller: Option<JoinHandle<()>>,
    monitor: Option<JoinHandle<()>>,
    /// The change monitor's poller, and its counters.
    change_monitor: Option<JoinHandle<()>>,
    pub(super) change_monitor_stats: Option<Arc<PollerStats>>,
    /// How long the change monitor lets a change settle before judging it (`INSPECT_GRACE_MS`).
    pub(super) monitor_grace: Duration,
    pub(super) redis: Option<RedisServer>,
    pub(super) moto: Option<MotoServer>,
}

impl Stack {
    /// Starts everything and returns once the HTTP API accepts connections and the invalidator
    /// has caught up with the seeded catalog, so a read right after this returns is not
    /// invalidated by a seed record arriving late.
    pub async fn start(options: StackOptions) -> Result<Stack, StackError> {
        // Every function's settings first, as each would parse them at its cold start: a
        // variable it would refuse stops the stack before anything is started. The cache's URL
        // is a stand-in until the cache is up (parsing connects to nothing).
        let settings = Settings::parse(&options, "redis://127.0.0.1")?;
        if settings.read.cache.key_type == KeyType::N {
            return Err(StackError::NumberKeys);
        }
        // Bind first: a port already in use should fail before the slow part of start-up.
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|source| StackError::Listen {
                addr: options.listen,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| StackError::Listen {
            addr: options.listen,
            source,
        })?;

        let start_redis = async {
            match (&options.redis_settings, &options.redis_url) {
                (Some(redis), _) => Ok((redis.url.clone(), None)),
                (None, Some(url)) => Ok((url.clone(), None)),
                (None, None) => RedisServer::start().await.map(|s| (s.url(), Some(s))),
            }
        };
        let start_moto = async {
            match &options.dynamodb_endpoint {
                Some(url) => Ok((url.clone(), None)),
                None => MotoServer::start().await.map(|s| (s.endpoint(), Some(s))),
            }
        };
        // moto takes seconds to import; start both at once.
        let ((redis_url, redis), (dynamodb_endpoint, moto)) =
            tokio::try_join!(start_redis, start_moto)?;

        let cache_settings = &settings.read.cache;
        let sdk = crate::table::local_sdk_config(&dynamodb_endpoint).await;
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let stream_arn = crate::table::ensure_table(
            &dynamodb,
            &options.table,
            &cache_settings.key_attribute,
            cache_settings.key_type,
        )
        .await?;
        let seeded = crate::seed::seed_if_empty(
            &dynamodb,
            &options.table,
            &cache_settings.key_attribute,
            options.seed_products,
        )
        .await?;

        if let Some(dir) = options.esm.on_failure.as_deref().and_then(Path::parent) {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|source| StackError::OnFailureDir {
                    path: dir.to_owned(),
                    source,
                })?;
            }
        }
        // Built the way the functions build themselves, so the stack runs what they run.
        let redis_error = |source| StackError::Redis {
            url: redis_url.clone(),
            source,
        };
        let base = options
            .redis_settings
            .clone()
            .unwrap_or_else(|| RedisSettings::new(&redis_url));
        let Settings {
            mut read,
            mut invalidator,
            mut inspector,
            inspect,
            metrics,
        } = settings;
        for redis in [
            &mut read.redis,
            &mut invalidator.redis,
            &mut inspector.redis,
        ] {
            *redis = on_the_stacks_cache(&base, redis);
        }
        let monitor_grace = inspect.grace;
        let sink = match &options.metrics {
            Some(path) => metrics_file(path)?,
            None => Sink::Off,
        };
        let [read_metrics, invalidator_metrics, inspector_metrics] = metrics;
        let inspector = match options.change_monitor {
            Some(_) => Some(
                Inspector::build(inspector, inspect, &sdk)
                    .await
                    .map_err(redis_error)?
                    .with_metrics(inspector_metrics, sink.clone()),
            ),
            None => None,
        };
        let key_attribute = read.cache.key_attribute.clone();
        let read = ReadPath::build(read, &sdk)
            .await
            .map_err(redis_error)?
            .with_metrics(read_metrics, sink.clone());
        let read = Arc::new(read);
        let invalidator = Invalidator::build(invalidator, &sdk)
            .await
            .map_err(redis_error)?
            .with_metrics(invalidator_metrics, sink);
        if redis.is_some() {
            // A Redis this stack just started, empty: refreshes write from the first record
            // on (see `RedisCache::declare_empty`).
            invalidator
                .cache()
                .declare_empty()
                .await
                .map_err(|e| redis_error(e.into()))?;
        }

        let (shutdown, _) = watch::channel(false);
        let (failures_tx, failures) = mpsc::unbounded_channel();
        let mut stack = Stack {
            http_addr,
            redis_url: redis_url.clone(),
            dynamodb_endpoint,
            table: options.table.clone(),
            key_attribute,
            seeded,
            options: options.clone(),
            http_stats: Arc::default(),
            poller_stats: Arc::default(),
            shutdown,
            failures,
            _failures_tx: failures_tx.clone(),
            server: None,
            poller: None,
            monitor: None,
            change_monitor: None,
            change_monitor_stats: None,
            monitor_grace,
            redis,
            moto,
        };

        let stream = StreamReader::new(aws_sdk_dynamodbstreams::Client::new(&sdk), stream_arn);
        if let (Some(esm), Some(inspector)) = (&options.change_monitor, inspector) {
            let poller = Poller::new(stream.clone(), esm.clone(), inspector);
            stack.change_monitor_stats = Some(poller.stats());
            let stopped = stack.stopped();
            let tx = failures_tx.clone();
            stack.change_monitor = Some(tokio::spawn(async move {
                if let Err(e) = poller.run(stopped).await {
                    let _ = tx.send(format!(
                        "the change monitor's poller stopped: {}",
                        chain(&e)
                    ));
                }
            }));
        }
        let poller = Poller::new(stream, options.esm.clone(), invalidator);
        stack.poller_stats = poller.stats();
        let stopped = stack.stopped();
        let tx = failures_tx.clone();
        stack.poller = Some(tokio::spawn(async move {
            if let Err(e) = poller.run(stopped).await {
                let _ = tx.send(format!("the stream poller stopped: {}", chain(&e)));
            }
        }));
        // From LATEST the seed records are skipped, as a new mapping would skip them: nothing to
        // wait for.
        if seeded > 0 && options.esm.starting_position == StartingPosition::TrimHorizon {
            if let Err(e) = stack.catch_up(seeded as u64).await {
                stack.shutdown().await;
                return Err(e);
            }
        }

        let router = crate::http::router(read, stack.http_stats.clone());
        let stopped = stack.stopped();
        let tx = failures_tx.clone();
        stack.server = Some(tokio::spawn(async move {
            if let Err(e) = crate::http::serve(listener, router, stopped).await {
                let _ = tx.send(format!("the HTTP server stopped: {e}"));
            }
        }));

        let owned: Vec<(&'static str, u16)> = stack
            .redis
            .iter()
            .map(|r| ("redis-server", r.port()))
            .chain(stack.moto.iter().map(|m| ("moto_server", m.port())))
            .collect();
        if !owned.is_empty() {
            stack.monitor = Some(tokio::spawn(watch_children(owned, failures_tx)));
        }
        Ok(stack)
    }

    /// Resolves when [`shutdown`](Self::shutdown) begins (or the stack is dropped).
    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            // An error means the sender is gone, which is a stop too.
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Waits until the invalidator has handled (or given up) `records` stream records.
    async fn catch_up(&mut self, records: u64) -> Result<(), StackError> {
        let deadline = tokio::time::Instant::now() + CATCH_UP_WITHIN;
        loop {
            let s = &self.poller_stats;
            let done = s.records_acknowledged.load(Ordering::Relaxed)
                + s.records_given_up.load(Ordering::Relaxed);
            if done >= records {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    done,
                    records,
                    "the invalidator has not caught up with the seeded catalog yet; serving anyway"
                );
                return Ok(());
            }
            tokio::select! {
                Some(failure) = self.failures.recv() => return Err(StackError::Failed(failure)),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// The bound address of the HTTP API.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://<addr>`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    pub fn dynamodb_endpoint(&self) -> &str {
        &self.dynamodb_endpoint
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Products written at start-up (0 if the table already had items).
    pub fn seeded(&self) -> usize {
        self.seeded
    }

    pub fn esm(&self) -> &EsmConfig {
        &self.options.esm
    }

    /// Shows the status line until `stop` resolves (`Ok`) or a part of the stack fails (`Err`).
    /// Does not shut down; call [`shutdown`](Self::shutdown) afterwards either way.
    pub async fn run_until(
        &mut self,
        stop: impl Future<Output = ()>,
        style: StatusStyle,
    ) -> Result<(), StackError> {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(style.every());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the banner has just been printed.
        ticker.tick().await;
        let mut shown = None;
        let result = loop {
            tokio::select! {
                biased;
                () = &mut stop => break Ok(()),
                Some(failure) = self.failures.recv() => break Err(StackError::Failed(failure)),
                _ = ticker.tick() => shown = style.show(self.stats(), shown),
            }
        };
        style.finish(self.stats(), shown);
        result
    }

    /// Stops serving (in-flight requests finish), stops the poller, then stops the children and
    /// waits for them to exit, so their ports refuse connections once this returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(monitor) = self.monitor.take() {
            monitor.abort();
        }
        if let Some(mut server) = self.server.take() {
            if tokio::time::timeout(DRAIN_HTTP_WITHIN, &mut server)
                .await
                .is_err()
            {
                server.abort();
            }
        }
        for mut poller in [self.poller.take(), self.change_monitor.take()]
            .into_iter()
            .flatten()
        {
            if tokio::time::timeout(STOP_POLLER_WITHIN, &mut poller)
                .await
                .is_err()
            {
                poller.abort();
            }
        }
        if let Some(redis) = &mut self.redis {
            redis.stop().await;
        }
        if let Some(moto) = &mut self.moto {
            moto.stop().await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in [
            &self.server,
            &self.poller,
            &self.monitor,
            &self.change_monitor,
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
        // The children's own Drop kills them.
    }
}

/// Each function's settings, parsed from its variables as its start-up parses them
/// (`product_cache::startup::*_from_env`), over the stack's own cache URL and table.
struct Settings {
    read: ReadSettings,
    invalidator: InvalidatorSettings,
    inspector: ReadSettings,
    inspect: InspectSettings,
    /// Per function, in [`Function::ALL`]'s order.
    metrics: [MetricsSettings; 3],
}

impl Settings {
    fn parse(options: &StackOptions, redis_url: &str) -> Result<Self, ConfigError> {
        let own = vec![
            ("REDIS_URL", redis_url),
            ("TABLE_NAME", options.table.as_str()),
        ];
        let of = |f: Function| Layers(vec![&own as &dyn Source, options.variables.of(f)]);
        let metrics = |f: Function| MetricsSettings::from_source(&of(f));
        Ok(Self {
            read: ReadSettings::from_source(&of(Function::Read))?,
            invalidator: InvalidatorSettings {
                mode: options.mode,
                ..InvalidatorSettings::from_source(&of(Function::Invalidator))?
            },
            inspector: ReadSettings::from_source(&of(Function::Inspector))?,
            inspect: InspectSettings::from_source(&of(Function::Inspector))?,
            metrics: [
                metrics(Function::Read)?,
                metrics(Function::Invalidator)?,
                metrics(Function::Inspector)?,
            ],
        })
    }
}

/// `base` (how to reach the stack's cache: one node, or the serverless stand-in with its TLS and
/// IAM) with the bounds `parsed` took from the function's variables.
fn on_the_stacks_cache(base: &RedisSettings, parsed: &RedisSettings) -> RedisSettings {
    RedisSettings {
        connect_timeout: parsed.connect_timeout,
        confirm_timeout: parsed.confirm_timeout,
        tcp_keepalive: parsed.tcp_keepalive,
        breaker: parsed.breaker,
        ..base.clone()
    }
}

/// Reports the first owned child whose port refuses connections: it exited (crashed or was
/// killed). A refused connection on loopback is definite; a slow answer is not a crash.
async fn watch_children(
    children: Vec<(&'static str, u16)>,
    failures: mpsc::UnboundedSender<String>,
) {
    let mut every = tokio::time::interval(HEALTH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        for &(name, port) in &children {
            let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    let _ = failures.send(format!(
                        "{name} on 127.0.0.1:{port} exited (it crashed or was killed)"
                    ));
                    return;
                }
            }
        }
    }
}
