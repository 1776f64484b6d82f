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

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use product_cache::cache::slots::slot_of;

use super::*;

/// The most arguments one request may carry, the command's name included (AWS: "clients
/// cannot issue a request with more than 3,999 arguments").
pub const MAX_ARGUMENTS: usize = 3_999;

/// Hash slots of a cluster.
const SLOTS: u16 = 16_384;

/// How long an IAM token is valid after it was signed (its `X-Amz-Expires`).
const TOKEN_VALIDITY: Duration = Duration::from_secs(900);

/// How long the replica may take to finish its first sync with the primary.
const REPLICA_SYNC_WITHIN: Duration = Duration::from_secs(20);

/// Commands a serverless cache does not offer: refused as unknown commands.
pub const REFUSED: &[&str] = &[
    "ACL",
    "BGREWRITEAOF",
    "BGSAVE",
    "CONFIG",
    "DEBUG",
    "FAILOVER",
    "FCALL",
    "FCALL_RO",
    "FUNCTION",
    "KEYS",
    "LASTSAVE",
    "LATENCY",
    "MEMORY",
    "MIGRATE",
    "MODULE",
    "MONITOR",
    "MOVE",
    "PSYNC",
    "REPLCONF",
    "REPLICAOF",
    "SAVE",
    "SHUTDOWN",
    "SLAVEOF",
    "SLOWLOG",
    "SWAPDB",
    "SYNC",
    "WAIT",
    "WAITAOF",
];

/// Pub/sub: served by real serverless, not by this stand-in (its reply queue is one reply per
/// request).
const NOT_EMULATED: &[&str] = &[
    "SUBSCRIBE",
    "PSUBSCRIBE",
    "SSUBSCRIBE",
    "UNSUBSCRIBE",
    "PUNSUBSCRIBE",
    "SUNSUBSCRIBE",
];

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

/// A server configuration with a fresh CA and a certificate for `localhost` and 127.0.0.1 it
/// signed; the CA's PEM.
fn tls_config() -> Result<(rustls::ServerConfig, String), Box<dyn std::error::Error>> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "local-stack serverless CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer)?;

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    Ok((config, ca_cert.pem()))
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>, ep: Endpoint) {
    let mut connections = JoinSet::new();
    loop {
        let (client, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "serverless front: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        connections.spawn(async move {
            let _ = client.set_nodelay(true);
            let tls = match tokio::time::timeout(PROBE_TIMEOUT * 5, acceptor.accept(client)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "serverless front: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            shared.connected(ep);
            if let Err(e) = Connection::run(tls, &shared, ep).await {
                tracing::debug!(error = %e, "serverless front: connection ended");
            }
        });
    }
}

/// Where a backend reply goes once read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Primary = 0,
    Replica = 1,
}

/// One reply owed to the client, in request order.
enum Pending {
    /// Made by the front.
    Reply(Vec<u8>),
    /// The next reply of that backend; `info`: trim it as `INFO`.
    Backend { backend: Backend, info: bool },
    /// `QUIT`: flush and close.
    Close,
}

/// What the front does with one request.
enum Action {
    Forward { backend: Backend, request: Vec<u8> },
    ForwardAsIs { backend: Backend, info: bool },
    Reply(Outcome, Vec<u8>),
    Close,
}

struct Connection<'a> {
    shared: &'a Shared,
    endpoint: Endpoint,
    authenticated: bool,
    readonly: bool,
}

impl<'a> Connection<'a> {
    async fn run<S>(tls: S, shared: &'a Shared, endpoint: Endpoint) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut conn = Connection {
            shared,
            endpoint,
            authenticated: shared.auth == Auth::None,
            readonly: false,
        };
        // Backends: the primary always; the replica for the reader endpoint.
        let primary = TcpStream::connect((Ipv4Addr::LOCALHOST, shared.primary_backend)).await?;
        primary.set_nodelay(true)?;
        let (primary_read, primary_write) = primary.into_split();
        let mut writers: [Option<BufWriter<OwnedWriteHalf>>; 2] =
            [Some(BufWriter::new(primary_write)), None];
        let mut readers: [Option<ReplyReader<OwnedReadHalf>>; 2] =
            [Some(ReplyReader::new(primary_read)), None];
        if endpoint == Endpoint::Reader {
            let replica = TcpStream::connect((Ipv4Addr::LOCALHOST, shared.replica_backend)).await?;
            replica.set_nodelay(true)?;
            let (read, write) = replica.into_split();
            writers[1] = Some(BufWriter::new(write));
            readers[1] = Some(ReplyReader::new(read));
        }
        let (client_read, client_write) = tokio::io::split(tls);
        let (tx, rx) = mpsc::unbounded_channel();
        let reading = conn.read_requests(client_read, &mut writers, tx);
        let writing = write_replies(client_write, &mut readers, rx, shared);
        tokio::try_join!(reading, writing).map(|_| ())
    }

    /// Reads the client's requests, forwards or answers each, and queues where its reply
    /// comes from. Forwarded requests are flushed to the backends once every complete request
    /// read so far has been handled, so a pipeline stays one.
    async fn read_requests<R: AsyncRead + Unpin>(
        &mut self,
        mut client: R,
        writers: &mut [Option<BufWriter<OwnedWriteHalf>>; 2],
        tx: mpsc::UnboundedSender<Pending>,
    ) -> io::Result<()> {
        let mut buf = Vec::with_capacity(16 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = client.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut consumed = 0;
            while let Some((args, used)) = parse_request(&buf[consumed..])? {
                let raw = &buf[consumed..consumed + used];
                consumed += used;
                if args.is_empty() {
                    continue;
                }
                let action = self.decide(&args);
                let pending = match action {
                    Action::Forward { backend, request } => {
                        let writer = writers[backend as usize]
                            .as_mut()
                            .expect("the endpoint has that backend");
                        writer.write_all(&request).await?;
                        Pending::Backend {
                            backend,
                            info: false,
                        }
                    }
                    Action::ForwardAsIs { backend, info } => {
                        let writer = writers[backend as usize]
                            .as_mut()
                            .expect("the endpoint has that backend");
                        writer.write_all(raw).await?;
                        Pending::Backend { backend, info }
                    }
                    Action::Reply(_, reply) => Pending::Reply(reply),
                    Action::Close => Pending::Close,
                };
                let close = matches!(pending, Pending::Close);
                if tx.send(pending).is_err() {
                    return Ok(());
                }
                if close {
                    for writer in writers.iter_mut().flatten() {
                        writer.flush().await?;
                    }
                    return Ok(());
                }
            }
            buf.drain(..consumed);
            for writer in writers.iter_mut().flatten() {
                writer.flush().await?;
            }
        }
    }

    /// What to do with one request (`args[0]` its command), counting it.
    fn decide(&mut self, args: &[Vec<u8>]) -> Action {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        let action = self.route(&name, args);
        let outcome = match &action {
            Action::Forward { .. } | Action::ForwardAsIs { .. } => Outcome::Forwarded,
            Action::Reply(outcome, _) => *outcome,
            Action::Close => Outcome::Answered,
        };
        self.shared.count(self.endpoint, outcome, &name);
        action
    }

    fn forward_as_is(&self, backend: Backend) -> Action {
        Action::ForwardAsIs {
            backend,
            info: false,
        }
    }

    fn route(&mut self, name: &str, args: &[Vec<u8>]) -> Action {
        let refuse = |text: String| Action::Reply(Outcome::Refused, error(&text));
        if args.len() > MAX_ARGUMENTS {
            return refuse(format!(
                "ERR too many arguments in request ({}); a serverless cache accepts at most \
                 {MAX_ARGUMENTS}",
                args.len()
            ));
        }
        let sub = || {
            args.get(1)
                .map(|s| String::from_utf8_lossy(s).to_ascii_uppercase())
                .unwrap_or_default()
        };
        match name {
            "AUTH" => return self.auth(args),
            "HELLO" => return self.hello(args),
            "QUIT" => return Action::Close,
            "PING" if !self.authenticated => {
                return Action::Reply(Outcome::Answered, b"+PONG\r\n".to_vec())
            }
            _ if !self.authenticated => {
                return refuse("NOAUTH Authentication required.".into());
            }
            _ => {}
        }
        if REFUSED.contains(&name) {
            return refuse(unknown_command(args));
        }
        if NOT_EMULATED.contains(&name) {
            return refuse(format!(
                "ERR {name} is not emulated by the local serverless stand-in"
            ));
        }
        let here = match self.endpoint {
            Endpoint::Primary => Backend::Primary,
            Endpoint::Reader => Backend::Replica,
        };
        match name {
            "READONLY" => {
                self.readonly = true;
                return Action::Reply(Outcome::Answered, b"+OK\r\n".to_vec());
            }
            "READWRITE" => {
                self.readonly = false;
                return Action::Reply(Outcome::Answered, b"+OK\r\n".to_vec());
            }
            "ASKING" => return Action::Reply(Outcome::Answered, b"+OK\r\n".to_vec()),
            "SELECT" => {
                return if args.get(1).map(Vec::as_slice) == Some(b"0") {
                    Action::Reply(Outcome::Answered, b"+OK\r\n".to_vec())
                } else {
                    refuse("ERR SELECT is not allowed in cluster mode".into())
                };
            }
            "CLUSTER" => return self.cluster(args),
            "SCRIPT" => {
                return match sub().as_str() {
                    "LOAD" | "EXISTS" => self.forward_as_is(Backend::Primary),
                    _ => refuse(unknown_subcommand(args, "SCRIPT")),
                }
            }
            "CLIENT" => {
                return match sub().as_str() {
                    "SETNAME" | "GETNAME" | "SETINFO" | "ID" | "INFO" | "NO-EVICT" | "NO-TOUCH" => {
                        self.forward_as_is(here)
                    }
                    _ => refuse(unknown_subcommand(args, "CLIENT")),
                }
            }
            "INFO" => {
                return Action::ForwardAsIs {
                    backend: here,
                    info: true,
                }
            }
            _ => {}
        }
        let (spec, read) = key_spec(name);
        let keys = match keys_of(spec, args) {
            Ok(keys) => keys,
            Err(text) => return refuse(text),
        };
        let slot = match keys.first() {
            None => None,
            Some(first) => {
                let slot = key_slot(first);
                if keys.iter().any(|k| key_slot(k) != slot) {
                    return refuse("CROSSSLOT Keys in request don't hash to the same slot".into());
                }
                Some(slot)
            }
        };
        match (self.endpoint, slot) {
            (Endpoint::Primary, _) => self.forward_as_is(Backend::Primary),
            (Endpoint::Reader, None) => self.forward_as_is(Backend::Replica),
            (Endpoint::Reader, Some(_)) if read && self.readonly => {
                self.forward_as_is(Backend::Replica)
            }
            (Endpoint::Reader, Some(slot)) => Action::Reply(
                Outcome::Moved,
                error(&format!(
                    "MOVED {slot} localhost:{}",
                    self.shared.primary_port
                )),
            ),
        }
    }

    fn auth(&mut self, args: &[Vec<u8>]) -> Action {
        let (user, secret) = match args {
            [_, password] => ("default".to_owned(), password),
            [_, user, password] => (String::from_utf8_lossy(user).into_owned(), password),
            _ => {
                return Action::Reply(
                    Outcome::Refused,
                    error("ERR wrong number of arguments for 'auth' command"),
                )
            }
        };
        self.check_auth(&user, &String::from_utf8_lossy(secret))
    }

    fn check_auth(&mut self, user: &str, secret: &str) -> Action {
        let ok = match &self.shared.auth {
            Auth::None => true,
            Auth::Password {
                user: expected,
                password,
            } => user == expected && secret == password,
            Auth::Iam {
                user: expected,
                cache_name,
                region,
            } => {
                user == expected
                    && iam_token_is_valid(secret, expected, cache_name, region, SystemTime::now())
            }
        };
        if ok {
            self.authenticated = true;
            Action::Reply(Outcome::Answered, b"+OK\r\n".to_vec())
        } else {
            Action::Reply(
                Outcome::Refused,
                error("WRONGPASS invalid username-password pair or user is disabled."),
            )
        }
    }

    /// `HELLO [2 [AUTH user pass] [SETNAME name]]`: protocol 2 only; the AUTH part is the
    /// front's, the rest goes to the backend.
    fn hello(&mut self, args: &[Vec<u8>]) -> Action {
        let mut forward: Vec<Vec<u8>> = vec![b"HELLO".to_vec()];
        if let Some(version) = args.get(1) {
            if version.as_slice() != b"2" {
                return Action::Reply(
                    Outcome::Refused,
                    error("NOPROTO sorry, this protocol version is not supported."),
                );
            }
            forward.push(version.clone());
        }
        let mut i = 2;
        while i < args.len() {
            let option = String::from_utf8_lossy(&args[i]).to_ascii_uppercase();
            match option.as_str() {
                "AUTH" if i + 2 < args.len() => {
                    let user = String::from_utf8_lossy(&args[i + 1]).into_owned();
                    let secret = String::from_utf8_lossy(&args[i + 2]).into_owned();
                    if let Action::Reply(Outcome::Refused, reply) = self.check_auth(&user, &secret)
                    {
                        return Action::Reply(Outcome::Refused, reply);
                    }
                    i += 3;
                }
                "SETNAME" if i + 1 < args.len() => {
                    forward.extend([args[i].clone(), args[i + 1].clone()]);
                    i += 2;
                }
                _ => {
                    return Action::Reply(
                        Outcome::Refused,
                        error(&format!("ERR Syntax error in HELLO option '{option}'")),
                    )
                }
            }
        }
        if !self.authenticated {
            return Action::Reply(
                Outcome::Refused,
                error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time"),
            );
        }
        let backend = match self.endpoint {
            Endpoint::Primary => Backend::Primary,
            Endpoint::Reader => Backend::Replica,
        };
        Action::Forward {
            backend,
            request: encode_request(&forward),
        }
    }

    fn cluster(&self, args: &[Vec<u8>]) -> Action {
        let shared = self.shared;
        let sub = args
            .get(1)
            .map(|s| String::from_utf8_lossy(s).to_ascii_uppercase())
            .unwrap_or_default();
        let answered = |reply: Vec<u8>| Action::Reply(Outcome::Answered, reply);
        let nodes = [
            (shared.primary_port, shared.primary_id.as_str()),
            (shared.reader_port, shared.replica_id.as_str()),
        ];
        match sub.as_str() {
            "SLOTS" => {
                let mut reply = b"*1\r\n*4\r\n:0\r\n".to_vec();
                reply.extend_from_slice(format!(":{}\r\n", SLOTS - 1).as_bytes());
                for (port, id) in nodes {
                    reply.extend_from_slice(b"*4\r\n");
                    reply.extend_from_slice(&bulk(b"localhost"));
                    reply.extend_from_slice(format!(":{port}\r\n").as_bytes());
                    reply.extend_from_slice(&bulk(id.as_bytes()));
                    reply.extend_from_slice(b"*0\r\n");
                }
                answered(reply)
            }
            "SHARDS" => {
                let mut reply = b"*1\r\n*4\r\n".to_vec();
                reply.extend_from_slice(&bulk(b"slots"));
                reply.extend_from_slice(b"*2\r\n:0\r\n");
                reply.extend_from_slice(format!(":{}\r\n", SLOTS - 1).as_bytes());
                reply.extend_from_slice(&bulk(b"nodes"));
                reply.extend_from_slice(b"*2\r\n");
                for (i, (port, id)) in nodes.into_iter().enumerate() {
                    let role: &[u8] = if i == 0 { b"master" } else { b"replica" };
                    reply.extend_from_slice(b"*16\r\n");
                    for (field, value) in [
                        (&b"id"[..], bulk(id.as_bytes())),
                        (b"tls-port", format!(":{port}\r\n").into_bytes()),
                        (b"ip", bulk(b"127.0.0.1")),
                        (b"endpoint", bulk(b"localhost")),
                        (b"hostname", bulk(b"localhost")),
                        (b"role", bulk(role)),
                        (b"replication-offset", b":0\r\n".to_vec()),
                        (b"health", bulk(b"online")),
                    ] {
                        reply.extend_from_slice(&bulk(field));
                        reply.extend_from_slice(&value);
                    }
                }
                answered(reply)
            }
            "NODES" => {
                let myself = |endpoint| {
                    if self.endpoint == endpoint {
                        "myself,"
                    } else {
                        ""
                    }
                };
                let text = format!(
                    "{pid} 127.0.0.1:{pport}@{pbus},localhost {pme}master - 0 0 1 connected 0-{last}\n\
                     {rid} 127.0.0.1:{rport}@{rbus},localhost {rme}slave {pid} 0 0 1 connected\n",
                    pid = shared.primary_id,
                    pport = shared.primary_port,
                    pbus = u32::from(shared.primary_port) + 10_000,
                    pme = myself(Endpoint::Primary),
                    last = SLOTS - 1,
                    rid = shared.replica_id,
                    rport = shared.reader_port,
                    rbus = u32::from(shared.reader_port) + 10_000,
                    rme = myself(Endpoint::Reader),
                );
                answered(bulk(text.as_bytes()))
            }
            "INFO" => {
                let text = "cluster_enabled:1\r\ncluster_state:ok\r\ncluster_slots_assigned:16384\r\n\
                            cluster_slots_ok:16384\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\n\
                            cluster_known_nodes:2\r\ncluster_size:1\r\ncluster_current_epoch:1\r\n\
                            cluster_my_epoch:1\r\n";
                answered(bulk(text.as_bytes()))
            }
            "MYID" => {
                let id = match self.endpoint {
                    Endpoint::Primary => &shared.primary_id,
                    Endpoint::Reader => &shared.replica_id,
                };
                answered(bulk(id.as_bytes()))
            }
            "KEYSLOT" if args.len() == 3 => {
                answered(format!(":{}\r\n", key_slot(&args[2])).into_bytes())
            }
            _ => Action::Reply(
                Outcome::Refused,
                error(&unknown_subcommand(args, "CLUSTER")),
            ),
        }
    }
}

/// Sends the queued replies to the client in request order, reading each backend's next reply
/// when its turn comes. Flushes whenever nothing more is queued.
async fn write_replies<W: AsyncWrite + Unpin>(
    client: W,
    readers: &mut [Option<ReplyReader<OwnedReadHalf>>; 2],
    mut rx: mpsc::UnboundedReceiver<Pending>,
    shared: &Shared,
) -> io::Result<()> {
    let mut out = BufWriter::new(client);
    loop {
        let pending = match rx.try_recv() {
            Ok(pending) => pending,
            Err(mpsc::error::TryRecvError::Empty) => {
                out.flush().await?;
                match rx.recv().await {
                    Some(pending) => pending,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        match pending {
            Pending::Reply(reply) => out.write_all(&reply).await?,
            Pending::Backend { backend, info } => {
                let reader = readers[backend as usize]
                    .as_mut()
                    .expect("the endpoint has that backend");
                let reply = reader.next_reply().await?;
                if info {
                    let keep = shared.evicted_keys.load(Ordering::SeqCst);
                    out.write_all(&trim_info(&reply, keep)).await?;
                } else {
                    out.write_all(&reply).await?;
                }
            }
            Pending::Close => {
                out.write_all(b"+OK\r\n").await?;
                out.flush().await?;
                let _ = out.shutdown().await;
                return Ok(());
            }
        }
    }
    out.flush().await?;
    let _ = out.shutdown().await;
    Ok(())
}

/// Reads whole RESP2 replies off a stream.
struct ReplyReader<R> {
    stream: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> ReplyReader<R> {
    fn new(stream: R) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    async fn next_reply(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(len) = reply_len(&self.buf)? {
                return Ok(self.buf.drain(..len).collect());
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the backend closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The line at the start of `buf` (without its CRLF) and the length with it.
fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn number(text: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| invalid("a RESP length is not a number"))
}

/// The length of the complete RESP2 reply at the start of `buf`, `None` if more is needed.
fn reply_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some((head, head_len)) = line(buf) else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(head_len)),
        b'$' => {
            let len = number(&head[1..])?;
            if len < 0 {
                return Ok(Some(head_len));
            }
            let total = head_len + len as usize + 2;
            Ok((buf.len() >= total).then_some(total))
        }
        b'*' => {
            let count = number(&head[1..])?;
            let mut at = head_len;
            for _ in 0..count.max(0) {
                match reply_len(&buf[at..])? {
                    Some(len) => at += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        _ => Err(invalid("the backend sent a reply that is not RESP2")),
    }
}

/// The request at the start of `buf`: its arguments and its length in bytes; `None` if more is
/// needed. A multibulk request, or an inline one (words on a line) as redis-cli sends.
fn parse_request(buf: &[u8]) -> io::Result<Option<(Vec<Vec<u8>>, usize)>> {
    let Some((head, head_len)) = line(buf) else {
        if buf.len() > 64 * 1024 && buf[0] != b'*' {
            return Err(invalid("inline request too long"));
        }
        return Ok(None);
    };
    if buf[0] != b'*' {
        let args = head
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        return Ok(Some((args, head_len)));
    }
    let count = number(&head[1..])?;
    let mut args = Vec::with_capacity(count.clamp(0, 4_096) as usize);
    let mut at = head_len;
    for _ in 0..count.max(0) {
        let Some((head, len)) = line(&buf[at..]) else {
            return Ok(None);
        };
        if head.first() != Some(&b'$') {
            return Err(invalid("a request's argument is not a bulk string"));
        }
        let size = number(&head[1..])?;
        if size < 0 {
            return Err(invalid("a request's argument has a negative length"));
        }
        let start = at + len;
        let end = start + size as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        args.push(buf[start..end].to_vec());
        at = end + 2;
    }
    Ok(Some((args, at)))
}

fn encode_request(args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(&bulk(arg));
    }
    out
}

fn bulk(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    out
}

fn error(text: &str) -> Vec<u8> {
    format!("-{}\r\n", text.replace(['\r', '\n'], " ")).into_bytes()
}

/// Redis's wording for a command it does not have.
fn unknown_command(args: &[Vec<u8>]) -> String {
    let mut rest = String::new();
    for arg in &args[1..] {
        if rest.len() >= 128 {
            break;
        }
        let arg = String::from_utf8_lossy(arg);
        let room = 128 - rest.len();
        let arg: String = arg.chars().take(room).collect();
        rest.push_str(&format!("'{arg}' "));
    }
    let name: String = String::from_utf8_lossy(&args[0])
        .chars()
        .take(128)
        .collect();
    format!("ERR unknown command '{name}', with args beginning with: {rest}")
}

/// Redis's wording for a subcommand it does not have.
fn unknown_subcommand(args: &[Vec<u8>], command: &str) -> String {
    let sub = args
        .get(1)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default();
    format!("ERR unknown subcommand '{sub}'. Try {command} HELP.")
}

fn key_slot(key: &[u8]) -> u16 {
    slot_of(&String::from_utf8_lossy(key))
}

/// Where a command's keys are.
#[derive(Debug, Clone, Copy)]
enum Keys {
    None,
    /// `args[1]`.
    First,
    /// `args[1..3]`.
    FirstTwo,
    /// Every argument.
    All,
    /// Every other argument from the first (`MSET k v k v`).
    Pairs,
    /// `EVAL script numkeys key...`.
    Script,
    /// `OBJECT <sub> key`.
    Second,
}

/// Where the keys of `name` are, and whether it only reads. Commands not listed are taken as
/// writes on their first argument.
fn key_spec(name: &str) -> (Keys, bool) {
    match name {
        "PING" | "ECHO" | "TIME" | "DBSIZE" | "RANDOMKEY" | "COMMAND" | "LOLWUT" | "SCAN"
        | "LASTSAVE" => (Keys::None, true),
        "FLUSHALL" | "FLUSHDB" | "MULTI" | "EXEC" | "DISCARD" | "UNWATCH" | "RESET" | "PUBLISH"
        | "SPUBLISH" | "PUBSUB" => (Keys::None, false),
        "DEL" | "UNLINK" | "SINTERSTORE" | "SUNIONSTORE" | "SDIFFSTORE" | "PFMERGE" => {
            (Keys::All, false)
        }
        "WATCH" => (Keys::All, true),
        "EXISTS" | "MGET" | "TOUCH" | "SINTER" | "SUNION" | "SDIFF" | "PFCOUNT" => {
            (Keys::All, true)
        }
        "MSET" | "MSETNX" => (Keys::Pairs, false),
        "RENAME" | "RENAMENX" | "COPY" | "SMOVE" | "LMOVE" | "RPOPLPUSH" | "BLMOVE"
        | "BRPOPLPUSH" => (Keys::FirstTwo, false),
        "EVAL" | "EVALSHA" => (Keys::Script, false),
        "EVAL_RO" | "EVALSHA_RO" => (Keys::Script, true),
        "OBJECT" => (Keys::Second, true),
        "GET" | "STRLEN" | "GETRANGE" | "SUBSTR" | "GETBIT" | "BITCOUNT" | "BITPOS"
        | "BITFIELD_RO" | "TTL" | "PTTL" | "EXPIRETIME" | "PEXPIRETIME" | "TYPE" | "DUMP"
        | "HGET" | "HMGET" | "HGETALL" | "HEXISTS" | "HLEN" | "HKEYS" | "HVALS" | "HSTRLEN"
        | "HRANDFIELD" | "HSCAN" | "LRANGE" | "LLEN" | "LINDEX" | "LPOS" | "SMEMBERS"
        | "SISMEMBER" | "SMISMEMBER" | "SCARD" | "SRANDMEMBER" | "SSCAN" | "ZRANGE"
        | "ZRANGEBYSCORE" | "ZRANGEBYLEX" | "ZREVRANGE" | "ZREVRANGEBYSCORE" | "ZREVRANGEBYLEX"
        | "ZSCORE" | "ZMSCORE" | "ZCARD" | "ZCOUNT" | "ZLEXCOUNT" | "ZRANK" | "ZREVRANK"
        | "ZRANDMEMBER" | "ZSCAN" | "XRANGE" | "XREVRANGE" | "XLEN" | "GEOPOS" | "GEODIST"
        | "GEOHASH" | "GEOSEARCH" | "SORT_RO" => (Keys::First, true),
        _ => (Keys::First, false),
    }
}

fn keys_of(spec: Keys, args: &[Vec<u8>]) -> Result<Vec<&[u8]>, String> {
    let rest = &args[1..];
    Ok(match spec {
        Keys::None => Vec::new(),
        Keys::First => rest.first().map(Vec::as_slice).into_iter().collect(),
        Keys::Second => rest.get(1).map(Vec::as_slice).into_iter().collect(),
        Keys::FirstTwo => rest.iter().take(2).map(Vec::as_slice).collect(),
        Keys::All => rest.iter().map(Vec::as_slice).collect(),
        Keys::Pairs => rest.iter().step_by(2).map(Vec::as_slice).collect(),
        Keys::Script => {
            let numkeys = rest
                .get(1)
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse::<usize>().ok());
            match numkeys {
                Some(0) => {
                    return Err("ERR Lua scripts without any input keys are not supported".into())
                }
                // Malformed: the backend words the error.
                None => Vec::new(),
                Some(n) => rest.iter().skip(2).take(n).map(Vec::as_slice).collect(),
            }
        }
    })
}

/// `INFO`'s reply with only the sections and fields a serverless cache documents.
fn trim_info(reply: &[u8], evicted_keys: bool) -> Vec<u8> {
    if reply.first() != Some(&b'$') {
        return reply.to_vec();
    }
    let Some((_, head_len)) = line(reply) else {
        return reply.to_vec();
    };
    let body = String::from_utf8_lossy(&reply[head_len..reply.len().saturating_sub(2)]);
    let mut out = String::new();
    let mut section = String::new();
    for text in body.split("\r\n") {
        if let Some(name) = text.strip_prefix("# ") {
            section = name.trim().to_owned();
            if matches!(
                section.as_str(),
                "Server" | "Clients" | "Memory" | "Stats" | "Keyspace"
            ) {
                if !out.is_empty() {
                    out.push_str("\r\n");
                }
                out.push_str(text);
                out.push_str("\r\n");
            }
            continue;
        }
        if text.is_empty() {
            continue;
        }
        let field = text.split(':').next().unwrap_or_default();
        let keep = match section.as_str() {
            "Server" => field.contains("version") || field == "server_name",
            "Clients" | "Keyspace" => true,
            "Memory" => field.starts_with("used_memory"),
            "Stats" => evicted_keys || field != "evicted_keys",
            _ => false,
        };
        if keep {
            out.push_str(text);
            out.push_str("\r\n");
        }
    }
    bulk(out.as_bytes())
}

/// Whether `token` is an IAM token of the serverless form for `user` on `cache_name` in
/// `region`, signed within [`TOKEN_VALIDITY`] of `now`. The signature's form is checked, not
/// its value.
pub fn iam_token_is_valid(
    token: &str,
    user: &str,
    cache_name: &str,
    region: &str,
    now: SystemTime,
) -> bool {
    let Some(query) = token.strip_prefix(&format!("{cache_name}/?")) else {
        return false;
    };
    let decode = |v: &str| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned()
    };
    let params: Vec<(&str, &str)> = query
        .split('&')
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let names: Vec<&str> = params.iter().map(|(n, _)| *n).collect();
    let mut expected = vec![
        "Action",
        "User",
        "ResourceType",
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
    ];
    if names.contains(&"X-Amz-Security-Token") {
        expected.push("X-Amz-Security-Token");
    }
    expected.push("X-Amz-Signature");
    if names != expected {
        return false;
    }
    let value = |name: &str| {
        params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or_default()
    };
    let date = value("X-Amz-Date");
    let Some(signed) = parse_amz_date(date) else {
        return false;
    };
    let age = match now.duration_since(signed) {
        Ok(age) => age,
        Err(ahead) => ahead.duration(),
    };
    let credential = decode(value("X-Amz-Credential"));
    let scope: Vec<&str> = credential.split('/').collect();
    let signature = value("X-Amz-Signature");
    value("Action") == "connect"
        && decode(value("User")) == user
        && value("ResourceType") == "ServerlessCache"
        && value("X-Amz-Algorithm") == "AWS4-HMAC-SHA256"
        && scope.len() == 5
        && !scope[0].is_empty()
        && scope[1] == &date[..8]
        && scope[2] == region
        && scope[3] == "elasticache"
        && scope[4] == "aws4_request"
        && age <= TOKEN_VALIDITY
        && value("X-Amz-Expires") == TOKEN_VALIDITY.as_secs().to_string()
        && value("X-Amz-SignedHeaders") == "host"
        && signature.len() == 64
        && signature
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `YYYYMMDDTHHMMSSZ` as a time.
fn parse_amz_date(date: &str) -> Option<SystemTime> {
    let b = date.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> { date.get(range)?.parse().ok() };
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3_600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates_parse() {
        let t = parse_amz_date("20240102T030405Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_704_164_645
        );
        assert!(parse_amz_date("20241302T030405Z").is_none());
    }

    #[test]
    fn requests_and_replies_parse_whole_or_not_at_all() {
        let req = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        let (args, len) = parse_request(req).unwrap().unwrap();
        assert_eq!(args, vec![b"GET".to_vec(), b"k".to_vec()]);
        assert_eq!(len, req.len());
        assert!(parse_request(&req[..req.len() - 1]).unwrap().is_none());
        let reply = b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n+OK\r\n";
        assert_eq!(reply_len(reply).unwrap(), Some(reply.len() - 5));
        assert_eq!(reply_len(&reply[..6]).unwrap(), None);
        assert_eq!(reply_len(b"$-1\r\n").unwrap(), Some(5));
    }

    #[test]
    fn info_keeps_the_documented_sections() {
        let body = "# Server\r\nredis_version:7.0.15\r\nos:Linux\r\n\r\n# Memory\r\nused_memory:1\r\nmaxmemory:2\r\n\r\n# Replication\r\nrole:master\r\n\r\n# Stats\r\nevicted_keys:3\r\nexpired_keys:0\r\n";
        let trimmed = trim_info(&bulk(body.as_bytes()), false);
        let text = String::from_utf8(trimmed).unwrap();
        assert!(text.contains("redis_version:7.0.15"), "{text}");
        assert!(text.contains("used_memory:1"), "{text}");
        assert!(text.contains("expired_keys:0"), "{text}");
        for gone in ["os:", "maxmemory:", "Replication", "role:", "evicted_keys"] {
            assert!(!text.contains(gone), "{gone}: {text}");
        }
        assert_eq!(reply_len(text.as_bytes()).unwrap(), Some(text.len()));
    }
}
