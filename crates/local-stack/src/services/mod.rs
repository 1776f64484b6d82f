//! Child-process wrappers around `redis-server` (or `valkey-server`: [`Engine`]) and
//! `moto_server`.
//!
//! Each instance gets its own free port and temporary directory, so tests can
//! run in parallel without seeing each other's data. Readiness is checked with
//! raw TCP rather than client crates so this crate stays dependency-light and a
//! broken client can't be mistaken for a broken server.
//!
//! - `redis.rs`: [`RedisServer`], and [`DelayedRedis`] behind a delaying proxy.
//! - `cluster.rs`: [`RedisCluster`], optionally with replicas or behind proxies.
//! - `moto.rs`: [`MotoServer`].
//! - `serverless/`: [`ServerlessCache`], a local ElastiCache Serverless cache (a TLS front over a
//!   primary and its replica).
//! - this file: finding the binaries (the [`Engine`] a node runs), free ports, and launching a
//!   child until it answers.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::proxy::DelayProxy;

mod cluster;
mod moto;
mod redis;
mod serverless;

pub use cluster::{RedisCluster, Role};
pub use moto::MotoServer;
pub use redis::{DelayedRedis, Engine, RedisServer};
pub use serverless::{
    iam_token_is_valid, Auth, Counters, Endpoint, ServerlessCache, ServerlessOptions,
    MAX_ARGUMENTS, REFUSED,
};

const SETUP_HINT: &str = "run scripts/setup.sh";

/// How many fresh ports to try when a child dies at startup. A port handed out
/// by [`free_port`] is only free at the moment we looked, so another process
/// can take it before the child binds it.
const PORT_ATTEMPTS: usize = 3;

const REDIS_READY_WITHIN: Duration = Duration::from_secs(10);
/// moto imports a large Python package tree before it binds, which on a cold,
/// busy CI machine can take many seconds.
const MOTO_READY_WITHIN: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Bounds a single probe so one wedged connection can't eat the whole deadline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const LOG_TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{what} is not installed ({hint})")]
    NotInstalled { what: &'static str, hint: String },

    #[error("could not spawn a local service: {0}")]
    Spawn(#[from] io::Error),

    #[error("{what} on 127.0.0.1:{port} was not ready after {waited:?}; last output:\n{log_tail}")]
    NotReady {
        what: &'static str,
        port: u16,
        waited: Duration,
        log_tail: String,
    },

    #[error(
        "{what} on 127.0.0.1:{port} exited during startup ({status}); last output:\n{log_tail}"
    )]
    Exited {
        what: &'static str,
        port: u16,
        status: ExitStatus,
        log_tail: String,
    },
}

/// `redis-cli`: `$REDIS_CLI`, else beside the redis-server in use, else on `PATH`.
pub fn find_redis_cli() -> Result<PathBuf, ServiceError> {
    if let Some(path) = from_env("REDIS_CLI", "redis-cli")? {
        return Ok(path);
    }
    let beside = find_redis_server()?.with_file_name("redis-cli");
    if is_executable(&beside) {
        return Ok(beside);
    }
    search_path("redis-cli").ok_or_else(|| ServiceError::NotInstalled {
        what: "redis-cli",
        hint: "run scripts/setup.sh (Debian's redis-server package ships redis-cli)".into(),
    })
}

/// Locates redis-server: `$REDIS_SERVER`, else `redis-server` on `PATH`, else
/// `/usr/bin/redis-server` (Debian's location, for when `PATH` is minimal).
pub fn find_redis_server() -> Result<PathBuf, ServiceError> {
    if let Some(path) = from_env("REDIS_SERVER", "redis-server")? {
        return Ok(path);
    }
    if let Some(path) = search_path("redis-server") {
        return Ok(path);
    }
    let debian = Path::new("/usr/bin/redis-server");
    if is_executable(debian) {
        return Ok(debian.to_path_buf());
    }
    Err(ServiceError::NotInstalled {
        what: "redis-server",
        hint: format!("{SETUP_HINT}, or set $REDIS_SERVER to its path"),
    })
}

/// Locates valkey-server: `$VALKEY_SERVER`, else the one scripts/setup.sh links into the
/// workspace's `.venv/bin` (the version it pins), else `valkey-server` on `PATH`.
pub fn find_valkey_server() -> Result<PathBuf, ServiceError> {
    if let Some(path) = from_env("VALKEY_SERVER", "valkey-server")? {
        return Ok(path);
    }
    let venv = workspace_root().join(".venv/bin/valkey-server");
    if is_executable(&venv) {
        return Ok(venv);
    }
    search_path("valkey-server").ok_or_else(|| ServiceError::NotInstalled {
        what: "valkey-server",
        hint: format!(
            "{SETUP_HINT} to link it into {}, or set $VALKEY_SERVER to its path",
            venv.display()
        ),
    })
}

/// `valkey-cli`: `$VALKEY_CLI`, else beside the valkey-server in use, else on `PATH`.
pub fn find_valkey_cli() -> Result<PathBuf, ServiceError> {
    if let Some(path) = from_env("VALKEY_CLI", "valkey-cli")? {
        return Ok(path);
    }
    let beside = find_valkey_server()?.with_file_name("valkey-cli");
    if is_executable(&beside) {
        return Ok(beside);
    }
    search_path("valkey-cli").ok_or_else(|| ServiceError::NotInstalled {
        what: "valkey-cli",
        hint: format!("{SETUP_HINT} (the pinned valkey-server comes with valkey-cli)"),
    })
}

/// Locates moto_server: `$MOTO_SERVER`, else the workspace's `.venv` made by
/// scripts/setup.sh, else `moto_server` on `PATH`. The venv wins over `PATH` so
/// tests use the version setup.sh pinned rather than whatever is installed.
pub fn find_moto_server() -> Result<PathBuf, ServiceError> {
    if let Some(path) = from_env("MOTO_SERVER", "moto_server")? {
        return Ok(path);
    }
    let venv = workspace_root().join(".venv/bin/moto_server");
    if is_executable(&venv) {
        return Ok(venv);
    }
    if let Some(path) = search_path("moto_server") {
        return Ok(path);
    }
    Err(ServiceError::NotInstalled {
        what: "moto_server",
        hint: format!(
            "{SETUP_HINT} to create {}, or set $MOTO_SERVER to its path",
            venv.display()
        ),
    })
}

/// Returns a loopback port that was free a moment ago. The listener is dropped
/// before returning, so the port can be taken by someone else before the caller
/// binds it; callers that spawn servers retry on a fresh port.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .expect("binding 127.0.0.1:0 should always succeed");
    listener
        .local_addr()
        .expect("a bound listener has a local address")
        .port()
}

fn workspace_root() -> PathBuf {
    // This crate lives at <root>/crates/local-stack.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(Path::parent)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// An override variable that is set but wrong is an error rather than a silent
/// fallback, so a typo doesn't quietly test against a different binary.
fn from_env(var: &str, what: &'static str) -> Result<Option<PathBuf>, ServiceError> {
    let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(&value);
    if is_executable(&path) {
        return Ok(Some(path));
    }
    // Allow a bare command name, as one would write in a shell.
    if path.components().count() == 1 {
        if let Some(found) = search_path(&value) {
            return Ok(Some(found));
        }
    }
    Err(ServiceError::NotInstalled {
        what,
        hint: format!(
            "${var}={} is not an executable file; fix or unset it, or {SETUP_HINT}",
            path.display()
        ),
    })
}

fn search_path(name: impl AsRef<Path>) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name.as_ref()))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[derive(Clone, Copy)]
enum Probe {
    /// `PING` must read `+PONG`: a bare TCP accept isn't enough because redis
    /// accepts connections while still loading.
    RedisPing,
    /// Any HTTP status line means the WSGI app is serving requests.
    Http,
}

struct Launch<'a> {
    what: &'static str,
    binary: &'a Path,
    args: Vec<OsString>,
    env: &'a [(&'a str, &'a str)],
    dir: &'a Path,
    port: u16,
    probe: Probe,
    ready_within: Duration,
}

impl Launch<'_> {
    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.what))
    }

    /// Spawns the child and waits for it to pass its probe. Returns
    /// [`ServiceError::Exited`] if it died first, which callers treat as a lost
    /// port race and retry.
    async fn run(&self) -> Result<Child, ServiceError> {
        // Truncated per attempt so the tail in an error belongs to this attempt.
        let log = File::create(self.log_path())?;
        let mut cmd = Command::new(self.binary);
        cmd.args(&self.args)
            .envs(self.env.iter().copied())
            .current_dir(self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{} ({}): {e}", self.what, self.binary.display()),
            )
        })?;

        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(self.exited(status));
            }
            if self.probe().await {
                // Another process that won the port race could have answered
                // the probe; our child would then be exiting on its bind error.
                if let Some(status) = child.try_wait()? {
                    return Err(self.exited(status));
                }
                tracing::debug!(
                    what = self.what,
                    port = self.port,
                    elapsed = ?started.elapsed(),
                    "local service ready"
                );
                return Ok(child);
            }
            if started.elapsed() >= self.ready_within {
                let _ = child.kill().await;
                return Err(ServiceError::NotReady {
                    what: self.what,
                    port: self.port,
                    waited: started.elapsed(),
                    log_tail: self.log_tail(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn exited(&self, status: ExitStatus) -> ServiceError {
        ServiceError::Exited {
            what: self.what,
            port: self.port,
            status,
            log_tail: self.log_tail(),
        }
    }

    fn log_tail(&self) -> String {
        match std::fs::read(self.log_path()) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                let start = lines.len().saturating_sub(LOG_TAIL_LINES);
                lines[start..].join("\n")
            }
            Err(e) => format!("<could not read {}: {e}>", self.log_path().display()),
        }
    }

    async fn probe(&self) -> bool {
        let attempt = async {
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).await?;
            let (request, expect): (&[u8], &[&[u8]]) = match self.probe {
                // A server with `requirepass` answers NOAUTH once it is serving.
                Probe::RedisPing => (b"PING\r\n", &[b"+PONG", b"-NOAUTH"]),
                Probe::Http => (
                    b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
                    &[b"HTTP/"],
                ),
            };
            stream.write_all(request).await?;
            let got = read_prefix(&mut stream, 7).await?;
            Ok::<bool, io::Error>(expect.iter().any(|e| got.starts_with(e)))
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, attempt).await,
            Ok(Ok(true))
        )
    }
}

/// Reads up to `len` bytes, stopping early at EOF.
async fn read_prefix(stream: &mut TcpStream, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    let mut filled = 0;
    while filled < len {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Makes the kernel SIGKILL the child when its parent goes away, so servers
/// don't outlive a test binary that was killed or aborted before Drop ran.
///
/// PDEATHSIG fires when the *thread* that forked the child exits, not when the
/// whole process does. tokio spawns from whichever thread polls `start()`, so a
/// server created on a short-lived thread (a `#[tokio::test]` body, a
/// `spawn_blocking` task) dies with that thread.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    // Their own process group: a Ctrl-C typed in a terminal goes to the foreground group, and
    // the children must be stopped by us, in order, not die of it before our handler runs.
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe syscalls (getppid, prctl, raise); it allocates nothing.
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect, in which
            // case no signal will ever come and we've been reparented.
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {
    // No equivalent; kill_on_drop still covers orderly shutdown.
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises tests that read or write `$MOTO_SERVER`, since the process
    /// environment is shared by all tests in this binary.
    static MOTO_ENV: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn send(port: u16, request: &[u8], read_len: usize) -> io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream.write_all(request).await?;
        let mut out = Vec::new();
        if read_len == usize::MAX {
            stream.read_to_end(&mut out).await?;
        } else {
            out = read_prefix(&mut stream, read_len).await?;
        }
        Ok(out)
    }

    async fn ping(port: u16) -> Vec<u8> {
        send(port, b"PING\r\n", 7).await.expect("PING round trip")
    }

    #[tokio::test]
    async fn redis_start_stop_restart() {
        let mut redis = RedisServer::start().await.expect("start redis");
        let port = redis.port();
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
        assert_eq!(ping(port).await, b"+PONG\r\n");

        // Data written before a restart must be gone after it.
        let set = send(port, b"SET k v\r\n", 5).await.unwrap();
        assert_eq!(set, b"+OK\r\n");

        redis.stop().await;
        let refused = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await;
        assert!(refused.is_err(), "port {port} still accepts after stop");
        redis.stop().await; // idempotent

        redis.restart().await.expect("restart redis");
        assert_eq!(redis.port(), port);
        assert_eq!(ping(port).await, b"+PONG\r\n");
        let get = send(port, b"GET k\r\n", 5).await.unwrap();
        assert_eq!(get, b"$-1\r\n", "restart should come back empty");
    }

    #[tokio::test]
    async fn redis_instances_are_independent() {
        let a = RedisServer::start().await.expect("start a");
        let b = RedisServer::start().await.expect("start b");
        assert_ne!(a.port(), b.port());
        let port_a = a.port();
        drop(a);
        // Drop only starts the kill; give the kernel a moment to close the socket.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port_a))
            .await
            .is_ok()
        {
            assert!(Instant::now() < deadline, "dropped server still listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ping(b.port()).await, b"+PONG\r\n");
    }

    #[tokio::test]
    async fn moto_serves_dynamodb() {
        let _env = MOTO_ENV.lock().await;
        let moto = MotoServer::start().await.expect("start moto");
        assert_eq!(moto.endpoint(), format!("http://127.0.0.1:{}", moto.port()));

        // moto routes by the service in the SigV4 credential scope; the
        // signature itself is not checked.
        let body = "{}";
        let request = format!(
            "POST / HTTP/1.0\r\n\
             Host: 127.0.0.1:{port}\r\n\
             X-Amz-Target: DynamoDB_20120810.ListTables\r\n\
             Content-Type: application/x-amz-json-1.0\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0\r\n\
             Content-Length: {len}\r\n\r\n{body}",
            port = moto.port(),
            len = body.len(),
        );
        let response = send(moto.port(), request.as_bytes(), usize::MAX)
            .await
            .expect("HTTP round trip");
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1."), "{response}");
        assert!(response.contains(" 200 "), "{response}");
        assert!(response.contains("\"TableNames\""), "{response}");
    }

    #[tokio::test]
    async fn find_moto_server_honours_env() {
        let _env = MOTO_ENV.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("my-moto");
        std::fs::write(&fake, "#!/bin/sh\n").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let saved = std::env::var_os("MOTO_SERVER");

        std::env::set_var("MOTO_SERVER", &fake);
        let found = find_moto_server();
        std::env::set_var("MOTO_SERVER", dir.path().join("missing"));
        let missing = find_moto_server();
        match saved {
            Some(v) => std::env::set_var("MOTO_SERVER", v),
            None => std::env::remove_var("MOTO_SERVER"),
        }

        assert_eq!(found.expect("found via $MOTO_SERVER"), fake);
        let err = missing.expect_err("a wrong $MOTO_SERVER must not fall back");
        assert!(err.to_string().contains("scripts/setup.sh"), "{err}");
    }

    #[tokio::test]
    async fn a_delayed_redis_answers_through_its_proxy() {
        let redis = DelayedRedis::start(Duration::from_millis(2)).await.unwrap();
        assert_ne!(redis.url(), redis.direct_url());
        assert_eq!(
            redis.proxy().port(),
            redis
                .url()
                .rsplit(':')
                .next()
                .unwrap()
                .parse::<u16>()
                .unwrap()
        );
        assert_eq!(ping(redis.proxy().port()).await, b"+PONG\r\n");
        assert_eq!(redis.proxy().round_trips(), 1);
        assert_eq!(ping(redis.server().port()).await, b"+PONG\r\n");
        assert_eq!(
            redis.proxy().round_trips(),
            1,
            "the direct PING bypassed the proxy"
        );
    }

    /// Clients learn the topology from CLUSTER SLOTS: it must name the proxies, never the nodes.
    #[tokio::test]
    async fn a_delayed_cluster_announces_its_proxies() {
        let cluster = RedisCluster::start_with_delay(3, Duration::ZERO)
            .await
            .expect("start the cluster");
        let proxy_ports: Vec<u16> = cluster.proxies().iter().map(DelayProxy::port).collect();
        assert_eq!(proxy_ports.len(), 3);
        assert_eq!(
            cluster.url(),
            format!("redis://127.0.0.1:{}", proxy_ports[0])
        );
        let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy_ports[1]))
            .await
            .unwrap();
        conn.write_all(b"CLUSTER SLOTS\r\n").await.unwrap();
        let mut reply = Vec::new();
        let mut buf = vec![0; 4096];
        // Three masters with one range each: wait until all three entries have arrived.
        while String::from_utf8_lossy(&reply).matches("127.0.0.1").count() < 3 {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&reply)
            );
            reply.extend_from_slice(&buf[..n]);
        }
        let reply = String::from_utf8_lossy(&reply);
        for port in &proxy_ports {
            assert!(
                reply.contains(&format!(":{port}\r\n")),
                "{port} missing: {reply}"
            );
        }
        for port in cluster.ports() {
            assert!(
                !reply.contains(&format!(":{port}\r\n")),
                "real port {port} announced: {reply}"
            );
        }
        assert!(cluster.round_trips() >= 1);
        cluster.reset_counters();
        assert_eq!(cluster.round_trips(), 0);
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("port is free");
    }
}
