//! `redis-server` (or `valkey-server`) children: one node, and one behind a delaying proxy.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use tokio::process::Child;

use super::*;

/// Which server a node runs. The template deploys Valkey on ElastiCache; most tests run Redis
/// OSS (Debian's `redis-server`), and the ones that matter run on Valkey too (`valkey-server`,
/// pinned by scripts/setup.sh). Valkey is a fork of Redis 7.2 with the same protocol, commands
/// and configuration options, so both take the same arguments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Engine {
    /// `redis-server`: [`find_redis_server`].
    #[default]
    Redis,
    /// `valkey-server`: [`find_valkey_server`].
    Valkey,
}

impl Engine {
    /// The server binary.
    pub fn server(self) -> Result<PathBuf, ServiceError> {
        match self {
            Engine::Redis => find_redis_server(),
            Engine::Valkey => find_valkey_server(),
        }
    }

    /// The CLI that comes with it (`--cluster create`).
    pub fn cli(self) -> Result<PathBuf, ServiceError> {
        match self {
            Engine::Redis => find_redis_cli(),
            Engine::Valkey => find_valkey_cli(),
        }
    }

    /// The server binary's name, as errors and log files name it.
    pub fn server_name(self) -> &'static str {
        match self {
            Engine::Redis => "redis-server",
            Engine::Valkey => "valkey-server",
        }
    }
}

/// A `redis-server` (or `valkey-server`: [`Engine`]) child process listening on a free loopback
/// port, with persistence off and its working directory in a private temp dir.
///
/// The child is killed when this value is dropped and, on Linux, also when the
/// thread that spawned it exits (`PR_SET_PDEATHSIG`), so a panicking or aborted
/// test leaves no orphan. Because the signal is tied to the *spawning thread*,
/// not the process, a server shared across tests (e.g. in a `static`) must be
/// started from a thread that outlives them all, such as a dedicated runtime
/// thread; one started inside a `#[tokio::test]` dies when that test's thread
/// ends.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    engine: Engine,
    binary: PathBuf,
    dir: TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// Spawns redis-server on a free port and waits until it answers `PING`.
    pub async fn start() -> Result<RedisServer, ServiceError> {
        Self::start_with(&[]).await
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments (e.g.
    /// `--requirepass`, `--cluster-enabled yes`), kept for restarts.
    pub async fn start_with(extra: &[&str]) -> Result<RedisServer, ServiceError> {
        Self::start_engine(Engine::Redis, extra).await
    }

    /// Like [`start_with`](Self::start_with), running `engine`'s server.
    pub async fn start_engine(engine: Engine, extra: &[&str]) -> Result<RedisServer, ServiceError> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let binary = engine.server()?;
        let dir = tempfile::Builder::new().prefix("local-redis-").tempdir()?;
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            match launch_redis(engine, &binary, dir.path(), port, &extra).await {
                Ok(child) => {
                    return Ok(RedisServer {
                        child: Some(child),
                        port,
                        engine,
                        binary,
                        dir,
                        extra,
                    })
                }
                Err(e @ ServiceError::Exited { .. }) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.expect("PORT_ATTEMPTS is non-zero"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server it runs.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The server's process id while it runs: a test can stall it (`SIGSTOP`) as a node that
    /// stops answering without closing its connections, and resume it (`SIGCONT`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether the child is running (not stopped by [`stop`](Self::stop)).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stalls the server (SIGSTOP): connections stay open and nothing answers, as a node in a
    /// long command, a swap storm or a failover's first seconds. [`resume`](Self::resume) ends it.
    pub fn stall(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a [`stall`](Self::stall)ed server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) on our own child's pid, which tokio has not reaped (it is running).
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Kills the server and waits for it to exit, so the port refuses
    /// connections once this returns. Calling it again is a no-op.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error here means the child is already gone, which is the goal.
            let _ = child.kill().await;
        }
    }

    /// Stops the server if running and starts a new one on the same port, so
    /// clients configured with [`url`](Self::url) reconnect to it. The new
    /// server starts with an empty dataset, like a crashed cache node would.
    pub async fn restart(&mut self) -> Result<(), ServiceError> {
        self.stop().await;
        let mut last_err = None;
        for attempt in 0..PORT_ATTEMPTS {
            if attempt > 0 {
                // The port is only briefly unavailable in the expected case: some
                // other test's `free_port` probe was handed it while it was free.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let (engine, binary, dir) = (self.engine, &self.binary, self.dir.path());
            match launch_redis(engine, binary, dir, self.port, &self.extra).await {
                Ok(child) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(e @ ServiceError::Exited { .. }) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.expect("PORT_ATTEMPTS is non-zero"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Drop can't await; tokio reaps the killed child in the background.
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}

/// A `redis-server` with a [`DelayProxy`] in front: what a client in another availability zone
/// sees. Clients use [`url`](Self::url) (the proxy); [`direct_url`](Self::direct_url) skips it,
/// for setup and for reading the server's own statistics.
#[derive(Debug)]
pub struct DelayedRedis {
    // Dropped first: the proxy stops before the server does.
    proxy: DelayProxy,
    server: RedisServer,
}

impl DelayedRedis {
    /// A fresh `redis-server` behind a proxy adding `delay` per round trip.
    pub async fn start(delay: Duration) -> Result<DelayedRedis, ServiceError> {
        Self::start_with(delay, &[]).await
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments.
    pub async fn start_with(delay: Duration, extra: &[&str]) -> Result<DelayedRedis, ServiceError> {
        let server = RedisServer::start_with(extra).await?;
        let upstream = (Ipv4Addr::LOCALHOST, server.port()).into();
        let proxy = DelayProxy::start(upstream, delay).await?;
        Ok(DelayedRedis { proxy, server })
    }

    /// `redis://127.0.0.1:<proxy port>`
    pub fn url(&self) -> String {
        self.proxy.redis_url()
    }

    /// `redis://127.0.0.1:<server port>`, not delayed.
    pub fn direct_url(&self) -> String {
        self.server.url()
    }

    pub fn proxy(&self) -> &DelayProxy {
        &self.proxy
    }

    pub fn server(&self) -> &RedisServer {
        &self.server
    }

    pub fn server_mut(&mut self) -> &mut RedisServer {
        &mut self.server
    }
}

async fn launch_redis(
    engine: Engine,
    binary: &Path,
    dir: &Path,
    port: u16,
    extra: &[String],
) -> Result<Child, ServiceError> {
    let port_arg = port.to_string();
    let args: [&std::ffi::OsStr; 10] = [
        "--port".as_ref(),
        port_arg.as_ref(),
        "--bind".as_ref(),
        "127.0.0.1".as_ref(),
        // No RDB snapshots or AOF: restart must come back empty, and tests
        // shouldn't pay for disk writes.
        "--save".as_ref(),
        "".as_ref(),
        "--appendonly".as_ref(),
        "no".as_ref(),
        "--dir".as_ref(),
        dir.as_os_str(),
    ];
    let spec = Launch {
        what: engine.server_name(),
        binary,
        args: args
            .iter()
            .map(OsString::from)
            .chain(extra.iter().map(OsString::from))
            .collect(),
        env: &[],
        dir,
        port,
        probe: Probe::RedisPing,
        ready_within: REDIS_READY_WITHIN,
    };
    spec.run().await
}
