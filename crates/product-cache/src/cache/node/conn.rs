//! One connection per node, formed in the background within its own budget, and formed again
//! once found dead.
//!
//! A cold connect is DNS, a TCP and a TLS handshake and AUTH: on a small Lambda that can take
//! longer than one request's `REDIS_TIMEOUT_MS`. So each attempt runs in a task of its own,
//! bounded by `REDIS_CONNECT_TIMEOUT_MS`, and the configured endpoint's starts when the cache is
//! built (during the function's init); a cluster's nodes start theirs as soon as the slot map
//! names them. Callers wait for an attempt at most their own budget; one that gives up leaves
//! the attempt running for the next. A failed attempt is dropped, and the next caller starts
//! another.
//!
//! A connection is one multiplexed socket: every call to the node shares it, in order. A call
//! that finds it dead (the server restarted, or closed it while the environment was frozen)
//! says so with [`NodeConn::discard`], which starts the next attempt at once; whether the call
//! itself goes again is the call layer's rule, not this file's.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt as _, Shared};
use redis::aio::MultiplexedConnection;

use super::Addr;
use crate::cache::CacheError;

/// How to connect to any node of this cache: what the configured URL says (TLS, user, password,
/// database), with each node's own host and port.
pub(crate) struct Connect {
    info: redis::ConnectionInfo,
    certs: Option<redis::TlsCertificates>,
    config: redis::AsyncConnectionConfig,
    timeout: Duration,
    /// `READONLY` on every connection, so that a replica serves reads: what replica reads
    /// need. Sent to primaries too, where it has no effect; not sent otherwise, since some
    /// Redis services refuse it.
    readonly: bool,
}

/// What [`Connect`] is built from.
pub(crate) struct ConnectOptions {
    pub timeout: Duration,
    /// PEM roots to trust for `rediss://` instead of the built-in Mozilla roots.
    pub root_cert: Option<Vec<u8>>,
    pub credentials: Option<crate::iam::IamCredentials>,
    /// Idle time before TCP keepalive probes start; `None` leaves them off.
    pub tcp_keepalive: Option<Duration>,
    pub readonly: bool,
}

impl Connect {
    /// From the configured URL; also the node that URL names.
    pub fn new(url: &str, options: ConnectOptions) -> Result<(Self, Addr), CacheError> {
        let info = redis::IntoConnectionInfo::into_connection_info(url)?;
        let endpoint = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => Addr::new(host.clone(), *port),
            other => {
                return Err(CacheError::Unexpected(format!(
                    "a Redis URL must name a host and port, not {other}"
                )))
            }
        };
        let tcp = match options.tcp_keepalive {
            // Probes after `idle` without traffic, and every `idle` after that: a connection a
            // middle box dropped silently while the function was idle is found dead by the
            // probes, not by a request that waits out its timeout on it.
            Some(idle) => info.tcp_settings().clone().set_keepalive(
                redis::io::tcp::socket2::TcpKeepalive::new()
                    .with_time(idle)
                    .with_interval(idle),
            ),
            None => info.tcp_settings().clone(),
        };
        let info = info.set_tcp_settings(tcp);
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.timeout))
            // No response timeout on the connection: it would apply to a whole pipeline, and a
            // large batch has a larger budget. Every call is bounded by its own.
            .set_response_timeout(None);
        let config = match options.credentials {
            Some(credentials) => config.set_credentials_provider(credentials),
            None => config,
        };
        let certs = options.root_cert.map(|pem| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        });
        let connect = Self {
            info,
            certs,
            config,
            timeout: options.timeout,
            readonly: options.readonly,
        };
        Ok((connect, endpoint))
    }

    fn client(&self, addr: &Addr) -> redis::RedisResult<redis::Client> {
        let (host, port) = (addr.host.clone(), addr.port);
        let at = match self.info.addr() {
            redis::ConnectionAddr::TcpTls { insecure, .. } => redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => redis::ConnectionAddr::Tcp(host, port),
        };
        let info = self.info.clone().set_addr(at);
        match &self.certs {
            Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
            None => redis::Client::open(info),
        }
    }

    async fn connect(&self, addr: &Addr) -> redis::RedisResult<MultiplexedConnection> {
        let attempt = async {
            let client = self.client(addr)?;
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            if self.readonly {
                redis::cmd("READONLY").query_async::<()>(&mut conn).await?;
            }
            Ok(conn)
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(conn) => conn,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {addr} took over {:?}", self.timeout),
            )
            .into()),
        }
    }
}

type Attempt = Shared<BoxFuture<'static, Result<MultiplexedConnection, Arc<redis::RedisError>>>>;

/// A connection to one node, with the generation it was formed in: a call that finds it dead
/// discards that generation only, not a newer connection another call has formed since.
#[derive(Clone)]
pub(crate) struct Conn {
    pub conn: MultiplexedConnection,
    pub generation: u64,
}

/// The connection to one node.
pub(crate) struct NodeConn {
    addr: Addr,
    connect: Arc<Connect>,
    // A std Mutex: held for a few instructions, never across an await.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    ready: Option<Conn>,
    attempt: Option<Attempt>,
    generation: u64,
}

impl NodeConn {
    fn new(addr: Addr, connect: Arc<Connect>) -> Self {
        let node = Self {
            addr,
            connect,
            state: Mutex::default(),
        };
        // The first attempt starts now: the task runs whether or not anyone awaits it.
        drop(node.attempt(&mut node.lock()));
        node
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection, waiting for a forming one at most `wait`.
    pub async fn get(&self, wait: Duration) -> Result<Conn, CacheError> {
        let attempt = {
            let mut state = self.lock();
            if let Some(conn) = &state.ready {
                return Ok(conn.clone());
            }
            self.attempt(&mut state)
        };
        match tokio::time::timeout(wait, attempt.clone()).await {
            Err(_) => Err(CacheError::Connecting(wait)),
            Ok(Ok(conn)) => {
                let mut state = self.lock();
                // The first waiter to see the attempt finish makes it the connection.
                if state.attempt.as_ref().is_some_and(|a| a.ptr_eq(&attempt)) {
                    state.attempt = None;
                    state.generation += 1;
                    state.ready = Some(Conn {
                        conn,
                        generation: state.generation,
                    });
                }
                state
                    .ready
                    .clone()
                    .ok_or_else(|| CacheError::Connecting(wait))
            }
            Ok(Err(e)) => {
                // Drop the failed attempt (unless another caller already replaced it), so the
                // next caller tries again.
                let mut state = self.lock();
                if state.attempt.as_ref().is_some_and(|a| a.ptr_eq(&attempt)) {
                    state.attempt = None;
                }
                Err(CacheError::Connect(e))
            }
        }
    }

    /// `conn` was found dead: the next [`get`](Self::get) waits for a new one, whose attempt
    /// starts now.
    pub fn discard(&self, conn: &Conn) {
        let mut state = self.lock();
        if state
            .ready
            .as_ref()
            .is_some_and(|r| r.generation == conn.generation)
        {
            state.ready = None;
            drop(self.attempt(&mut state));
        }
    }

    /// The attempt in progress, or a new one in a task of its own (so it progresses while no
    /// caller waits for it).
    fn attempt(&self, state: &mut State) -> Attempt {
        if let Some(attempt) = &state.attempt {
            return attempt.clone();
        }
        let (connect, addr) = (Arc::clone(&self.connect), self.addr.clone());
        let task = tokio::spawn(async move { connect.connect(&addr).await });
        let attempt: Attempt = async move {
            match task.await {
                Ok(result) => result.map_err(Arc::new),
                Err(e) => Err(Arc::new(redis::RedisError::from(std::io::Error::other(e)))),
            }
        }
        .boxed()
        .shared();
        state.attempt = Some(attempt.clone());
        attempt
    }
}

/// Every node's connection, made on first use.
pub(crate) struct Pool {
    connect: Arc<Connect>,
    nodes: Mutex<HashMap<Addr, Arc<NodeConn>>>,
}

impl Pool {
    pub fn new(connect: Connect) -> Self {
        Self {
            connect: Arc::new(connect),
            nodes: Mutex::default(),
        }
    }

    /// The node's connection; a node not seen before starts connecting now.
    pub fn node(&self, addr: &Addr) -> Arc<NodeConn> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(node) = nodes.get(addr) {
            return Arc::clone(node);
        }
        let node = Arc::new(NodeConn::new(addr.clone(), Arc::clone(&self.connect)));
        nodes.insert(addr.clone(), Arc::clone(&node));
        node
    }

    /// Keeps the connections to `nodes` only (a node gone from the cluster's map is closed),
    /// and starts connecting to those not connected yet, so that the first call to a node
    /// finds its connection formed.
    pub fn keep(&self, nodes: &HashSet<Addr>) {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|addr, _| nodes.contains(addr));
        for addr in nodes {
            self.node(addr);
        }
    }
}

/// An error that says the connection was lost before or while the request went out (reset,
/// closed, broken), as opposed to one the server answered or a timeout.
pub(crate) fn is_dead_connection(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error()
}
