//! A local stand-in for an ElastiCache Serverless cache (Valkey / Redis OSS): [`ServerlessCache`].
//!
//! A front that speaks RESP over TLS on two loopback ports, the *primary endpoint* and the
//! *reader endpoint* (AWS: 6379 and 6380 of one hostname; here two free ports), over two
//! `redis-server` children: a primary (not in cluster mode, `--maxmemory-policy volatile-lru`,
//! `--maxmemory` the cache's storage maximum when one is given) and a replica of it. The front
//! parses every request and either forwards it (in order, pipelined, without a round trip per
//! command) or answers it itself, as AWS documents a serverless cache:
//!
//! - TLS only: a CA and a certificate for `localhost` and 127.0.0.1 made in process; the CA is
//!   written to [`ca_file`](ServerlessCache::ca_file) for `REDIS_CA_FILE`. A plain-TCP client gets
//!   no answer (its bytes fail the TLS handshake and the connection is closed).
//! - One virtual shard: `CLUSTER SLOTS|SHARDS|NODES|INFO|KEYSLOT|MYID` are answered by the
//!   front, with slots 0-16383 on `localhost:<primary port>` and one replica
//!   `localhost:<reader port>` (hostnames, as serverless reports them).
//! - Unavailable commands refused without reaching a backend, in Redis's wording (`ERR unknown
//!   command '<name>', with args beginning with: ...`, or `unknown subcommand` for `SCRIPT
//!   KILL|FLUSH`, `CLIENT KILL|LIST|...` and the other `CLUSTER` subcommands): see [`REFUSED`].
//!   `FLUSHALL`/`FLUSHDB` are forwarded (AWS lists them as supported on serverless).
//! - At most 3,999 arguments a request (the command's name included); keyless scripts refused
//!   (`ERR Lua scripts without any input keys are not supported`); a script's or multi-key
//!   command's keys in more than one slot: `CROSSSLOT Keys in request don't hash to the same
//!   slot`; `SELECT` of a database other than 0 refused, as in cluster mode.
//! - The reader endpoint: a keyed command answers `MOVED <slot> localhost:<primary port>` until
//!   the connection sent `READONLY`, and a write always does; reads after `READONLY` (and
//!   keyless reads such as `INFO`, `DBSIZE`, `RANDOMKEY`, `TIME`) are served by the replica:
//!   eventually consistent, as AWS documents. Scripts are writes there (`EVAL_RO`/`EVALSHA_RO`
//!   are reads); `SCRIPT LOAD|EXISTS` always go to the primary.
//! - Authentication ([`Auth`]): none, an RBAC user with a password, or IAM: `AUTH <user>
//!   <token>` accepted only for a token of the serverless form (`ResourceType=ServerlessCache`,
//!   this cache's name, this Region, signed within 15 minutes of now; its signature is checked for
//!   form, not recomputed). Before a successful AUTH every command but `AUTH`, `HELLO`, `PING`
//!   and `QUIT` answers `NOAUTH Authentication required.`. `HELLO` accepts protocol 2 only.
//! - `INFO` trimmed to the `Server` (version fields), `Clients`, `Memory` (`used_memory*`),
//!   `Stats` and `Keyspace` sections; `evicted_keys` can be switched off
//!   ([`set_evicted_keys_in_info`](ServerlessCache::set_evicted_keys_in_info)).
//! - Counters per endpoint ([`ServerlessCache::counters`]): connections, and requests forwarded,
//!   answered by the front, redirected (`MOVED`) and refused, by command name.
//!
//! Not emulated: real serverless spreads the slots over many shards behind its endpoint (here
//! one primary serves all of them), scales, and throttles by ECPU (`ThrottledCmds`); no ECPU
//! or CloudWatch metric is computed; pub/sub (`SUBSCRIBE`...) and `MONITOR` are refused here
//! (the front's reply queue is one reply a request); `CLUSTER COUNTKEYSINSLOT|GETKEYSINSLOT`
//! are refused; a refused command inside `MULTI` is refused in place rather than aborting the
//! transaction; replies are RESP2 only. A token's signature is not verified (no secret key is
//! known to the stand-in). Non-UTF-8 keys are hashed after a lossy UTF-8 conversion.
//!
//! - this file: the cache's lifecycle (its servers, its endpoints, the state its connections
//!   share) and its counters.
//! - `connection.rs`: the connection loop (accept, TLS handshake, requests in, replies out).
//! - `policy.rs`: what the front does with a request (refuse, answer, forward, `MOVED`).
//! - `auth.rs`: `AUTH`/`HELLO` and the IAM token's form check.
//! - `cluster_replies.rs`: the `CLUSTER` replies of the one virtual shard.
//! - `info.rs`: `INFO` trimming.
//! - `resp.rs`: RESP2 parsing and encoding.
//! - `tls.rs`: the CA and the endpoints' certificate.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::*;

mod auth;
mod cluster_replies;
mod connection;
mod info;
mod policy;
mod resp;
mod tls;

pub use auth::iam_token_is_valid;
pub use policy::{MAX_ARGUMENTS, REFUSED};

use connection::serve;
use resp::ReplyReader;
use tls::tls_config;

/// How long the replica may take to finish its first sync with the primary.
const REPLICA_SYNC_WITHIN: Duration = Duration::from_secs(20);

/// How a serverless cache authenticates its clients.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Auth {
    /// Every connection is authenticated from the start (quick local use; real serverless
    /// always has a user group).
    #[default]
    None,
    /// An RBAC user with a password: `AUTH <user> <password>`.
    Password { user: String, password: String },
    /// An IAM-enabled user: `AUTH <user> <token>`, the token signed for this serverless cache.
    Iam {
        user: String,
        cache_name: String,
        region: String,
    },
}

/// What [`ServerlessCache::start`] makes.
#[derive(Debug, Clone)]
pub struct ServerlessOptions {
    pub auth: Auth,
    /// The cache's storage maximum (`--maxmemory` of the primary, in bytes); `None`: no limit.
    pub max_memory: Option<u64>,
    /// Whether `INFO`'s `# Stats` has `evicted_keys`; changeable later.
    pub evicted_keys_in_info: bool,
}

impl Default for ServerlessOptions {
    fn default() -> Self {
        Self {
            auth: Auth::None,
            max_memory: None,
            evicted_keys_in_info: true,
        }
    }
}

/// One of the cache's two endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// Reads and writes, served by the primary.
    Primary,
    /// Reads after `READONLY`, served by the replica; writes are redirected (`MOVED`).
    Reader,
}

/// What one endpoint has seen since the start or the last reset, by command name (upper case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections accepted (TLS handshakes that succeeded).
    pub connections: u64,
    /// Requests sent on to a backend.
    pub forwarded: BTreeMap<String, u64>,
    /// Requests the front answered itself with a success (`CLUSTER SLOTS`, `AUTH`, `READONLY`).
    pub answered: BTreeMap<String, u64>,
    /// Requests answered `MOVED` (the reader endpoint).
    pub moved: BTreeMap<String, u64>,
    /// Requests refused with an error by the front (unavailable, too many arguments, keyless
    /// script, `CROSSSLOT`, `NOAUTH`, `WRONGPASS`), never reaching a backend.
    pub refused: BTreeMap<String, u64>,
}

impl Counters {
    fn total(map: &BTreeMap<String, u64>) -> u64 {
        map.values().sum()
    }

    pub fn forwarded_total(&self) -> u64 {
        Self::total(&self.forwarded)
    }

    pub fn refused_total(&self) -> u64 {
        Self::total(&self.refused)
    }

    pub fn moved_total(&self) -> u64 {
        Self::total(&self.moved)
    }

    /// Refusals of `name` (upper case).
    pub fn refused_of(&self, name: &str) -> u64 {
        self.refused.get(name).copied().unwrap_or(0)
    }

    /// Forwards of `name` (upper case).
    pub fn forwarded_of(&self, name: &str) -> u64 {
        self.forwarded.get(name).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Forwarded,
    Answered,
    Moved,
    Refused,
}

#[derive(Debug)]
struct Shared {
    auth: Auth,
    evicted_keys: AtomicBool,
    primary_port: u16,
    reader_port: u16,
    primary_backend: u16,
    replica_backend: u16,
    primary_id: String,
    replica_id: String,
    counters: Mutex<[Counters; 2]>,
}

impl Shared {
    fn count(&self, endpoint: Endpoint, outcome: Outcome, name: &str) {
        let mut counters = self.counters.lock().unwrap();
        let counters = &mut counters[endpoint as usize];
        let map = match outcome {
            Outcome::Forwarded => &mut counters.forwarded,
            Outcome::Answered => &mut counters.answered,
            Outcome::Moved => &mut counters.moved,
            Outcome::Refused => &mut counters.refused,
        };
        *map.entry(name.to_owned()).or_default() += 1;
    }

    fn connected(&self, endpoint: Endpoint) {
        self.counters.lock().unwrap()[endpoint as usize].connections += 1;
    }
}

/// A local ElastiCache Serverless cache: see the module docs for what it emulates. Stops its
/// front and both servers when dropped. Runs on the tokio runtime it was started from; its
/// servers die with the thread that started them (see [`RedisServer`]).
#[derive(Debug)]
pub struct ServerlessCache {
    // The front stops first (its tasks own every client connection), then the servers.
    tasks: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    primary: RedisServer,
    replica: RedisServer,
    ca_file: PathBuf,
    _dir: TempDir,
}

impl ServerlessCache {
    /// Starts the primary, its replica (waiting for their first sync) and the TLS front.
    pub async fn start(options: ServerlessOptions) -> Result<ServerlessCache, ServiceError> {
        // No 5-second wait before the replica's first sync (the diskless default).
        let mut args = vec![
            "--maxmemory-policy".to_owned(),
            "volatile-lru".to_owned(),
            "--repl-diskless-sync-delay".to_owned(),
            "0".to_owned(),
        ];
        if let Some(max) = options.max_memory {
            args.extend(["--maxmemory".to_owned(), max.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let primary = RedisServer::start_with(&args).await?;
        let primary_port = primary.port().to_string();
        let replica = RedisServer::start_with(&[
            "--replicaof",
            "127.0.0.1",
            &primary_port,
            "--maxmemory-policy",
            "volatile-lru",
        ])
        .await?;
        wait_for_sync(replica.port()).await?;

        let dir = tempfile::Builder::new()
            .prefix("local-serverless-")
            .tempdir()?;
        let (tls, ca_pem) = tls_config().map_err(|e| io::Error::other(e.to_string()))?;
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca_pem)?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let primary_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let reader_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let shared = Arc::new(Shared {
            auth: options.auth,
            evicted_keys: AtomicBool::new(options.evicted_keys_in_info),
            primary_port: primary_listener.local_addr()?.port(),
            reader_port: reader_listener.local_addr()?.port(),
            primary_backend: primary.port(),
            replica_backend: replica.port(),
            primary_id: node_id(),
            replica_id: node_id(),
            counters: Mutex::default(),
        });
        let tasks = vec![
            tokio::spawn(serve(
                primary_listener,
                acceptor.clone(),
                shared.clone(),
                Endpoint::Primary,
            )),
            tokio::spawn(serve(
                reader_listener,
                acceptor,
                shared.clone(),
                Endpoint::Reader,
            )),
        ];
        Ok(ServerlessCache {
            tasks,
            shared,
            primary,
            replica,
            ca_file,
            _dir: dir,
        })
    }

    /// The primary endpoint's port (AWS: 6379).
    pub fn primary_port(&self) -> u16 {
        self.shared.primary_port
    }

    /// The reader endpoint's port (AWS: 6380).
    pub fn reader_port(&self) -> u16 {
        self.shared.reader_port
    }

    /// `rediss://localhost:<primary port>`, without credentials.
    pub fn url(&self) -> String {
        format!("rediss://localhost:{}", self.primary_port())
    }

    /// `rediss://localhost:<reader port>`, without credentials.
    pub fn reader_url(&self) -> String {
        format!("rediss://localhost:{}", self.reader_port())
    }

    /// The primary endpoint's URL with `user` (and `password`, if any) in it:
    /// `rediss://user[:password]@localhost:<port>`.
    pub fn url_for(&self, user: &str, password: Option<&str>) -> String {
        let password = password.map(|p| format!(":{p}")).unwrap_or_default();
        format!(
            "rediss://{user}{password}@localhost:{}",
            self.primary_port()
        )
    }

    /// The primary endpoint's URL with what [`Auth`] needs in it: the user and password of
    /// [`Auth::Password`], the user of [`Auth::Iam`] (the token is the client's to add).
    pub fn authed_url(&self) -> String {
        match &self.shared.auth {
            Auth::None => self.url(),
            Auth::Password { user, password } => self.url_for(user, Some(password)),
            Auth::Iam { user, .. } => self.url_for(user, None),
        }
    }

    /// The PEM file of the CA that signed the endpoints' certificate (`REDIS_CA_FILE`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The CA's PEM, as `redis::TlsCertificates::root_cert` takes it.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca_file).expect("the CA file is ours and still there")
    }

    /// The primary's server: its own statistics (`INFO commandstats`) over plain TCP.
    pub fn backend(&self) -> &RedisServer {
        &self.primary
    }

    /// The replica's server.
    pub fn replica(&self) -> &RedisServer {
        &self.replica
    }

    /// Whether `INFO`'s `# Stats` section keeps `evicted_keys` from now on.
    pub fn set_evicted_keys_in_info(&self, keep: bool) {
        self.shared.evicted_keys.store(keep, Ordering::SeqCst);
    }

    /// What `endpoint` has seen since the start or the last [`reset_counters`](Self::reset_counters).
    pub fn counters(&self, endpoint: Endpoint) -> Counters {
        self.shared.counters.lock().unwrap()[endpoint as usize].clone()
    }

    /// Connections accepted by both endpoints.
    pub fn connections(&self) -> u64 {
        let counters = self.shared.counters.lock().unwrap();
        counters.iter().map(|c| c.connections).sum()
    }

    pub fn reset_counters(&self) {
        *self.shared.counters.lock().unwrap() = Default::default();
    }

    /// The node id the cluster commands give the endpoint.
    pub fn node_id(&self, endpoint: Endpoint) -> &str {
        match endpoint {
            Endpoint::Primary => &self.shared.primary_id,
            Endpoint::Reader => &self.shared.replica_id,
        }
    }
}

impl Drop for ServerlessCache {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// 40 hex digits, as a cluster node's id.
fn node_id() -> String {
    (0..40)
        .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap())
        .collect()
}

/// Waits until the replica reports `master_link_status:up`.
async fn wait_for_sync(port: u16) -> Result<(), ServiceError> {
    let started = Instant::now();
    loop {
        let info = async {
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
            stream.write_all(b"INFO replication\r\n").await?;
            let mut reader = ReplyReader::new(stream);
            reader.next_reply().await
        };
        if let Ok(Ok(reply)) = tokio::time::timeout(PROBE_TIMEOUT, info).await {
            if String::from_utf8_lossy(&reply).contains("master_link_status:up") {
                return Ok(());
            }
        }
        if started.elapsed() >= REPLICA_SYNC_WITHIN {
            return Err(ServiceError::NotReady {
                what: "redis-server replica",
                port,
                waited: started.elapsed(),
                log_tail: "master_link_status never became up".into(),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
