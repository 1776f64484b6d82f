//! The whole system in one process: Redis and DynamoDB (children started here unless given),
//! the table with a sample catalog, the read function's handler behind local HTTP, and the
//! invalidator fed from the table's stream by the local event source mapping.
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
    CacheSettings, InvalidationMode, InvalidatorSettings, ReadSettings, RedisSettings,
};
use product_cache::id::KeyType;
use product_cache::invalidate::Invalidator;
use product_cache::read::ReadPath;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

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
    #[error("creating {path}")]
    OnFailureDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the local stack's catalog has string ids; unset KEY_TYPE=N to run it")]
    NumberKeys,
    /// A child process, the HTTP server or the poller stopped while the stack was running.
    #[error("{0}")]
    Failed(String),
}

/// What to run and where.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Port 0 picks a free port; [`Stack::http_addr`] tells which.
    pub listen: SocketAddr,
    pub table: String,
    /// A running Redis to use; `None` starts a `redis-server` child.
    pub redis_url: Option<String>,
    /// A running DynamoDB (with Streams) to use; `None` starts a `moto_server` child.
    pub dynamodb_endpoint: Option<String>,
    /// Products written to the table when it is empty; 0 writes none.
    pub seed_products: usize,
    /// The event source mapping's settings; `on_failure` is where given-up records are written.
    pub esm: EsmConfig,
    /// Where `esm` came from, for the start-up message.
    pub esm_source: String,
    pub mode: InvalidationMode,
    pub settings: CacheSettings,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("a valid address"),
            table: DEFAULT_TABLE.into(),
            redis_url: None,
            dynamodb_endpoint: None,
            seed_products: crate::seed::DEFAULT_PRODUCTS,
            esm: EsmConfig {
                poll_interval: LOCAL_POLL_INTERVAL,
                ..EsmConfig::default()
            },
            esm_source: "Lambda's defaults".into(),
            mode: InvalidationMode::Delete,
            settings: CacheSettings::default(),
        }
    }
}

/// The counters shown on the status line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub bypasses: u64,
    /// Stream records the invalidator handled successfully.
    pub invalidations: u64,
    pub records_given_up: u64,
    pub function_errors: u64,
    /// Age of the newest record of the last batch when it was handed over.
    pub iterator_age_ms: u64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hits {} · misses {} · bypasses {} · invalidations {} · iterator age {} ms",
            self.hits, self.misses, self.bypasses, self.invalidations, self.iterator_age_ms
        )?;
        if self.function_errors > 0 {
            write!(f, " · invalidator errors {}", self.function_errors)?;
        }
        if self.records_given_up > 0 {
            write!(f, " · records given up {}", self.records_given_up)?;
        }
        Ok(())
    }
}

/// How the status line is written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusStyle {
    /// Rewritten in place once a second (stderr is a terminal).
    Terminal,
    /// A plain line every ten seconds (stderr is a file or pipe: no control characters, and a
    /// log that does not grow by a line a second).
    Lines,
    /// Nothing.
    Quiet,
}

impl StatusStyle {
    pub fn for_stderr() -> Self {
        use std::io::IsTerminal as _;
        if io::stderr().is_terminal() {
            Self::Terminal
        } else {
            Self::Lines
        }
    }

    fn every(self) -> Duration {
        match self {
            Self::Terminal => Duration::from_secs(1),
            Self::Lines | Self::Quiet => Duration::from_secs(10),
        }
    }

    fn show(self, stats: &Stats) {
        match self {
            // Clear to the end of the line: the new text can be shorter than the old.
            Self::Terminal => eprint!("\r{stats}\x1b[K"),
            Self::Lines => eprintln!("{stats}"),
            Self::Quiet => {}
        }
    }

    fn finish(self, stats: &Stats) {
        match self {
            Self::Terminal => eprintln!("\r{stats}\x1b[K"),
            Self::Lines => eprintln!("{stats}"),
            Self::Quiet => {}
        }
    }
}

/// A running stack. Stop it with [`Stack::shutdown`]; dropping it instead stops the tasks and
/// kills the children without waiting for them.
pub struct Stack {
    http_addr: SocketAddr,
    redis_url: String,
    dynamodb_endpoint: String,
    table: String,
    key_attribute: String,
    seeded: usize,
    options: StackOptions,
    http_stats: Arc<HttpStats>,
    poller_stats: Arc<PollerStats>,
    shutdown: watch::Sender<bool>,
    failures: mpsc::UnboundedReceiver<String>,
    // Keeps `failures` open even when every task has ended.
    _failures_tx: mpsc::UnboundedSender<String>,
    server: Option<JoinHandle<()>>,
    poller: Option<JoinHandle<()>>,
    monitor: Option<JoinHandle<()>>,
    redis: Option<RedisServer>,
    moto: Option<MotoServer>,
}

impl Stack {
    /// Starts everything and returns once the HTTP API accepts connections and the invalidator
    /// has caught up with the seeded catalog, so a read right after this returns is not
    /// invalidated by a seed record arriving late.
    pub async fn start(options: StackOptions) -> Result<Stack, StackError> {
        if options.settings.key_type == KeyType::N {
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
            match &options.redis_url {
                Some(url) => Ok((url.clone(), None)),
                None => RedisServer::start().await.map(|s| (s.url(), Some(s))),
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

        let settings = &options.settings;
        let sdk = crate::table::local_sdk_config(&dynamodb_endpoint).await;
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let stream_arn = crate::table::ensure_table(
            &dynamodb,
            &options.table,
            &settings.key_attribute,
            settings.key_type,
        )
        .await?;
        let seeded = crate::seed::seed_if_empty(
            &dynamodb,
            &options.table,
            &settings.key_attribute,
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
        // Strongly consistent reads, as the read function is configured by default: an
        // eventually consistent read could put the version the stream just replaced back.
        let redis_error = |source| StackError::Redis {
            url: redis_url.clone(),
            source,
        };
        let redis_settings = RedisSettings::new(&redis_url);
        let read = ReadSettings::new(redis_settings.clone(), &options.table, settings.clone());
        let read = Arc::new(ReadPath::build(read, &sdk).await.map_err(redis_error)?);
        let invalidator = InvalidatorSettings {
            redis: redis_settings,
            mode: options.mode,
            cache: settings.clone(),
        };
        let invalidator = Invalidator::build(invalidator, &sdk)
            .await
            .map_err(redis_error)?;

        let (shutdown, _) = watch::channel(false);
        let (failures_tx, failures) = mpsc::unbounded_channel();
        let mut stack = Stack {
            http_addr,
            redis_url: redis_url.clone(),
            dynamodb_endpoint,
            table: options.table.clone(),
            key_attribute: settings.key_attribute.clone(),
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
            redis,
            moto,
        };

        let stream = StreamReader::new(aws_sdk_dynamodbstreams::Client::new(&sdk), stream_arn);
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

    /// The counters now.
    pub fn stats(&self) -> Stats {
        let h = &self.http_stats;
        let p = &self.poller_stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            requests: get(&h.requests),
            hits: get(&h.hits),
            misses: get(&h.misses),
            bypasses: get(&h.bypasses),
            invalidations: get(&p.records_acknowledged),
            records_given_up: get(&p.records_given_up),
            function_errors: get(&p.function_errors),
            iterator_age_ms: get(&p.iterator_age_ms),
        }
    }

    /// The start-up message: where everything is, and `set_price` (the command that changes a
    /// price in this stack) among three commands to try.
    pub fn banner(&self, set_price: &str) -> String {
        let started = |owned: bool| if owned { "started here" } else { "given" };
        let url = self.http_url();
        let esm = &self.options.esm;
        let seeded = match self.seeded {
            0 => "already had items; not seeded".to_owned(),
            n => format!("seeded with {n} products"),
        };
        let on_failure = esm
            .on_failure
            .as_deref()
            .map_or("(none)".into(), |p| p.display().to_string());
        format!(
            "listening on {url}\n\
             \n\
             \x20 HTTP API    {url}/products/{{id}}  (the read function's handler)\n\
             \x20 Redis       {redis}  ({redis_how})\n\
             \x20 DynamoDB    {dynamo}  ({dynamo_how}); table {table} {seeded}\n\
             \x20 stream      invalidator ({mode} mode) via {esm_desc}\n\
             \x20             settings from {source}\n\
             \x20 on-failure  {on_failure}\n\
             \n\
             Try:\n\
             \x20 curl -si {url}/products/kb-001\n\
             \x20 {set_price}\n\
             \x20 curl -si {url}/products/kb-001\n\
             \n\
             Ctrl-C stops everything.",
            redis = self.redis_url,
            redis_how = started(self.redis.is_some()),
            dynamo = self.dynamodb_endpoint,
            dynamo_how = started(self.moto.is_some()),
            table = self.table,
            mode = match self.options.mode {
                InvalidationMode::Delete => "delete",
                InvalidationMode::Refresh => "refresh",
            },
            esm_desc = describe_esm(esm),
            source = self.options.esm_source,
        )
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
        let result = loop {
            tokio::select! {
                biased;
                () = &mut stop => break Ok(()),
                Some(failure) = self.failures.recv() => break Err(StackError::Failed(failure)),
                _ = ticker.tick() => style.show(&self.stats()),
            }
        };
        style.finish(&self.stats());
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
        if let Some(mut poller) = self.poller.take() {
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
        for task in [&self.server, &self.poller, &self.monitor]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        // The children's own Drop kills them.
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

/// One line about the mapping's settings.
pub fn describe_esm(esm: &EsmConfig) -> String {
    let position = match esm.starting_position {
        StartingPosition::TrimHorizon => "TRIM_HORIZON",
        StartingPosition::Latest => "LATEST",
    };
    let unbounded = |v: Option<String>| v.unwrap_or_else(|| "unbounded".into());
    let duration = |d: Duration| humantime::format_duration(d).to_string();
    format!(
        "{position}, batch {}, window {}, retries {}, max record age {}, bisect {}, {}, poll every {}",
        esm.batch_size,
        duration(esm.batching_window),
        unbounded(esm.max_retry_attempts.map(|n| n.to_string())),
        unbounded(esm.max_record_age.map(duration)),
        if esm.bisect_on_error { "on" } else { "off" },
        if esm.report_batch_item_failures {
            "partial batch failures reported"
        } else {
            "whole-batch retries"
        },
        duration(esm.poll_interval),
    )
}

/// An error and its sources, on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // `#[error(transparent)]` and wrappers that repeat their source add nothing.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Where a running stack is, for the commands that act on it (`set-price`, `warm`). Written by
/// the run command to `<state dir>/state.json` and removed when it stops.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StackState {
    pub pid: u32,
    pub http: String,
    pub redis_url: String,
    pub dynamodb_endpoint: String,
    pub table: String,
    pub key_attribute: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no running stack found: {path} does not exist (start one with scripts/run.sh, or pass --endpoint)")]
    Missing { path: PathBuf },
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a state file")]
    Invalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the stack that wrote {path} (pid {pid}) is no longer running (start one with scripts/run.sh, or pass --endpoint)")]
    Stale { path: PathBuf, pid: u32 },
}

impl StackState {
    pub const FILE: &'static str = "state.json";

    pub fn of(stack: &Stack) -> Self {
        Self {
            pid: std::process::id(),
            http: stack.http_url(),
            redis_url: stack.redis_url.clone(),
            dynamodb_endpoint: stack.dynamodb_endpoint.clone(),
            table: stack.table.clone(),
            key_attribute: stack.key_attribute.clone(),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(Self::FILE)
    }

    /// Writes the file whole or not at all (a reader never sees half of it).
    pub fn write(&self, dir: &Path) -> io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = Self::path(dir);
        let tmp = dir.join(format!(".{}.{}", Self::FILE, self.pid));
        let json = serde_json::to_string_pretty(self).expect("plain data serialises");
        std::fs::write(&tmp, json + "\n")?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The state of the stack running from `dir`; an error if there is none or it has exited.
    pub fn read(dir: &Path) -> Result<Self, StateError> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::Missing { path })
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let state: Self = serde_json::from_str(&text).map_err(|source| StateError::Invalid {
            path: path.clone(),
            source,
        })?;
        if !process_exists(state.pid) {
            return Err(StateError::Stale {
                path,
                pid: state.pid,
            });
        }
        Ok(state)
    }

    /// Removes the file if this process wrote it: another stack may have started from the same
    /// directory since, and its file must stay.
    pub fn remove_if_ours(dir: &Path) {
        let path = Self::path(dir);
        let ours = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Self>(&t).ok())
            .is_some_and(|s| s.pid == std::process::id());
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    // EPERM: it exists, but belongs to someone else.
    alive || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_round_trip_and_know_a_dead_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = StackState {
            pid: std::process::id(),
            http: "http://127.0.0.1:3000".into(),
            redis_url: "redis://127.0.0.1:1".into(),
            dynamodb_endpoint: "http://127.0.0.1:2".into(),
            table: "Products".into(),
            key_attribute: "productId".into(),
        };
        assert!(matches!(
            StackState::read(dir.path()),
            Err(StateError::Missing { .. })
        ));
        state.write(dir.path()).unwrap();
        assert_eq!(StackState::read(dir.path()).unwrap(), state);

        // A pid that cannot exist (above the kernel's pid_max limit).
        state.pid = 1 << 23;
        state.write(dir.path()).unwrap();
        assert!(matches!(
            StackState::read(dir.path()),
            Err(StateError::Stale { .. })
        ));
        StackState::remove_if_ours(dir.path());
        assert!(StackState::path(dir.path()).exists(), "not ours to remove");
        state.pid = std::process::id();
        state.write(dir.path()).unwrap();
        StackState::remove_if_ours(dir.path());
        assert!(!StackState::path(dir.path()).exists());
    }

    #[test]
    fn the_status_line_names_every_counter() {
        let status = Stats {
            hits: 3,
            misses: 1,
            invalidations: 1000,
            iterator_age_ms: 42,
            ..Stats::default()
        };
        assert_eq!(
            status.to_string(),
            "hits 3 · misses 1 · bypasses 0 · invalidations 1000 · iterator age 42 ms"
        );
        let failing = Stats {
            records_given_up: 2,
            ..status
        };
        assert!(failing.to_string().ends_with("records given up 2"));
    }
}
