//! Layer 2: a pipeline sent to one node, the one way every operation reaches Redis.
//!
//! A call goes to one node by address, through that node's circuit breaker (`breaker.rs`), on
//! that node's connection (`conn.rs`), within the budget its caller gives. The rules, the same
//! for every call:
//! - **Breaker.** While the node's breaker is open the call is not made
//!   ([`CacheError::BreakerOpen`]), and the topology is asked to look again (the node may have
//!   been replaced). The outcome is recorded on the breaker of the node the call reached: a
//!   replica's hit on the replica's, a script on the primary's.
//! - **`NOSCRIPT`** (a node restarted, promoted or new does not know a script): the request's
//!   scripts are loaded and the pipeline goes again. A command that answered `NOSCRIPT` did not
//!   run; what else a pipeline with scripts carries must be safe to repeat (it is: staged
//!   documents under the batch's own names, and reads).
//! - **A dead connection** (reset, closed, broken: the server restarted or dropped the connection
//!   while the environment was frozen): the connection is discarded and a new one starts
//!   forming, and the pipeline goes again on it, scripts loaded, *only* if the request was
//!   declared [`Repeat::Safe`]: the server may have run it before the connection died.
//! - **A timeout** ends the call; nothing is sent again (the node is slow, not gone, and the
//!   request may still run).
//! - **A redirection** (`MOVED`, `ASK`, `READONLY`, `TRYAGAIN`, `CLUSTERDOWN`) marks the topology
//!   stale: the slot map the call was routed by is out of date. A request safe to repeat that
//!   was answered `MOVED` to one node in whole (every command: a pipeline of one slot's keys sent
//!   to a node that no longer serves it, after a failover) goes once to that node. Otherwise the
//!   redirection stays the command's error reply, and the caller decides what it means (a read
//!   bypasses, a batch's op is retried).
//!
//! **Fencing.** A call that is its breaker's trial (the first to a node that had stopped
//! answering) says so in [`Reply::trial`]: a primary stalled for longer than the cluster's node
//! timeout has been replaced by its replica meanwhile, and when it goes on it answers the
//! requests it held from its old data before the cluster bus tells it it was demoted. Callers do
//! not serve a trial's data (a read answers from the table) and confirm a trial's writes on
//! every configured replica.

use std::time::Duration;

use redis::aio::ConnectionLike as _;

use super::breaker::{is_node_failure, Breakers, Permit};
use super::conn::{is_dead_connection, Conn, Pool};
use super::topology::Topology;
use super::Addr;
use crate::cache::CacheError;

/// Whether a pipeline may go out again after its connection was found dead, when the server may
/// already have run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repeat {
    /// Running it twice leaves what running it once leaves, and answers the same (reads,
    /// idempotent writes, a probe that recognises its own lease).
    Safe,
    /// It must not run twice (a fill, whose second run would find its lease gone and report
    /// itself refused though it landed).
    Never,
}

/// A pipeline, the scripts it calls by `EVALSHA`, and whether it may go again.
pub(crate) struct Request<'a> {
    pub pipe: redis::Pipeline,
    pub scripts: &'a [&'a redis::Script],
    pub repeat: Repeat,
}

/// A call's answer: each command's reply (error replies included), the node that gave it
/// (another than the one called, after a `MOVED`), whether the call was its node's breaker
/// trial (see fencing above), and the connection it went on, for a follow-up that must go on
/// the same one (`WAIT` waits for its own connection's writes).
pub(crate) struct Reply {
    pub replies: Vec<redis::RedisResult<redis::Value>>,
    pub node: Addr,
    pub trial: bool,
    pub conn: Conn,
}

/// The right to call one node, taken before the call is built (a batch builds its pipeline
/// knowing whether it is a trial).
pub(crate) struct Admitted {
    node: Addr,
    permit: Permit,
}

impl Admitted {
    pub fn is_trial(&self) -> bool {
        self.permit.is_trial()
    }
}

/// Calls to the nodes of one cache.
#[derive(Clone)]
pub(crate) struct Caller {
    pub topology: Topology,
    pool: std::sync::Arc<Pool>,
    breakers: std::sync::Arc<Breakers>,
}

impl Caller {
    pub fn new(
        topology: Topology,
        pool: std::sync::Arc<Pool>,
        breakers: std::sync::Arc<Breakers>,
    ) -> Self {
        Self {
            topology,
            pool,
            breakers,
        }
    }

    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }

    /// Waits at most `wait` for `node`'s connection, still forming after a cold start or a
    /// reconnect: a batch does before its budget starts (a read bypasses instead).
    pub async fn connected(&self, node: &Addr, wait: Duration) {
        let _ = self.ready(node, wait).await;
    }

    /// [`connected`](Self::connected), saying whether the connection is up.
    pub async fn ready(&self, node: &Addr, wait: Duration) -> Result<(), CacheError> {
        self.pool.node(node).get(wait).await.map(|_| ())
    }

    /// The right to call `node`, or [`CacheError::BreakerOpen`] at once (and the topology
    /// marked stale: the node may have been replaced).
    pub fn admit(&self, node: &Addr) -> Result<Admitted, CacheError> {
        match self.breakers.of(node).admit() {
            Ok(permit) => Ok(Admitted {
                node: node.clone(),
                permit,
            }),
            Err(e) => {
                self.topology.mark_stale();
                Err(e)
            }
        }
    }

    /// `request` to `node` (see the module's doc), within `budget` once connected; a
    /// connection still forming is waited for at most `wait`.
    pub async fn call(
        &self,
        node: &Addr,
        request: &Request<'_>,
        wait: Duration,
        budget: Duration,
    ) -> Result<Reply, CacheError> {
        let admitted = self.admit(node)?;
        self.send(admitted, request, wait, budget).await
    }

    /// [`call`](Self::call) with the right to call taken already.
    pub async fn send(
        &self,
        admitted: Admitted,
        request: &Request<'_>,
        wait: Duration,
        budget: Duration,
    ) -> Result<Reply, CacheError> {
        let reply = self.send_once(admitted, request, wait, budget).await?;
        let Some(target) = moved_whole(&request.pipe, &reply.replies) else {
            return Ok(reply);
        };
        if request.repeat == Repeat::Never || target == reply.node {
            return Ok(reply);
        }
        let admitted = self.admit(&target)?;
        self.send_once(admitted, request, wait, budget).await
    }

    async fn send_once(
        &self,
        admitted: Admitted,
        request: &Request<'_>,
        wait: Duration,
        budget: Duration,
    ) -> Result<Reply, CacheError> {
        let Admitted { node, permit } = admitted;
        let trial = permit.is_trial();
        let conn = self.pool.node(&node);
        let outcome = async {
            let current = conn.get(wait).await?;
            let deadline = tokio::time::Instant::now() + budget;
            let sent = send(&conn, current, request, deadline);
            match tokio::time::timeout_at(deadline, sent).await {
                Ok(sent) => sent,
                Err(_) => Err(CacheError::Timeout(budget)),
            }
        }
        .await;
        permit.record(&outcome);
        self.noted(&outcome);
        outcome.map(|(replies, conn)| Reply {
            replies,
            node,
            trial,
            conn,
        })
    }

    /// A follow-up to `reply`'s call on the very connection it went on (nothing is sent again,
    /// and a connection replaced since fails it), recorded on `node`'s breaker.
    pub async fn follow_up(
        &self,
        node: &Addr,
        reply: &Reply,
        pipe: &redis::Pipeline,
        budget: Duration,
    ) -> Result<Vec<redis::RedisResult<redis::Value>>, CacheError> {
        let permit = self.admit(node)?.permit;
        let mut conn = reply.conn.conn.clone();
        let outcome =
            match tokio::time::timeout(budget, conn.req_packed_commands(pipe, 0, pipe.len())).await
            {
                Ok(Ok(replies)) => Ok(replies.into_iter().map(|r| r.extract_error()).collect()),
                Ok(Err(e)) => Err(CacheError::from(e)),
                Err(_) => Err(CacheError::Timeout(budget)),
            };
        permit.record(&outcome);
        if let Err(CacheError::Redis(e)) = &outcome {
            if is_dead_connection(e) {
                self.pool.node(node).discard(&reply.conn);
            }
        }
        let outcome = outcome.map(|replies| (replies, reply.conn.clone()));
        self.noted(&outcome);
        outcome.map(|(replies, _)| replies)
    }

    /// What a call's outcome tells the topology: a node that could not be reached, or a
    /// redirection, says the map may be out of date.
    fn noted<T>(&self, outcome: &Result<(Vec<redis::RedisResult<T>>, Conn), CacheError>) {
        let stale = match outcome {
            Err(e) => map_may_be_stale(e),
            Ok((replies, _)) => replies
                .iter()
                .any(|r| r.as_ref().err().is_some_and(is_redirection)),
        };
        if stale {
            self.topology.mark_stale();
        }
    }
}

/// The pipeline on `current`, by the rules of the module's doc.
async fn send(
    conn: &super::conn::NodeConn,
    mut current: Conn,
    request: &Request<'_>,
    deadline: tokio::time::Instant,
) -> Result<(Vec<redis::RedisResult<redis::Value>>, Conn), CacheError> {
    let pipe = &request.pipe;
    let mut loaded = false;
    let mut resent = false;
    // The error of a connection that died with the request on it, once it is sent again.
    let mut lost: Option<redis::RedisError> = None;
    loop {
        let sent = current.conn.req_packed_commands(pipe, 0, pipe.len()).await;
        match sent {
            Ok(replies) => {
                let replies: Vec<_> = replies.into_iter().map(|r| r.extract_error()).collect();
                if loaded || request.scripts.is_empty() || !replies.iter().any(is_noscript) {
                    return Ok((replies, current));
                }
            }
            Err(e) if is_dead_connection(&e) => {
                conn.discard(&current);
                if resent || request.repeat == Repeat::Never {
                    return Err(e.into());
                }
                resent = true;
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                // The request may have run before its connection died: if it cannot go again,
                // that (the connection's error) is what the caller hears, not "never sent".
                current = match conn.get(left).await {
                    Ok(current) => current,
                    Err(_) => return Err(e.into()),
                };
                lost = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
        // Loaded before the pipeline goes again: on NOSCRIPT, and on a new connection, which may
        // be to a restarted server that has no scripts either.
        if !request.scripts.is_empty() {
            let mut load = redis::pipe();
            for script in request.scripts {
                load.load_script(script);
            }
            let loading = current.conn.req_packed_commands(&load, 0, load.len()).await;
            let failed = match loading {
                Ok(replies) => replies.into_iter().find_map(|r| r.extract_error().err()),
                Err(e) => Some(e),
            };
            if let Some(e) = failed {
                return Err(lost.unwrap_or(e).into());
            }
            loaded = true;
        }
    }
}

/// Whether a call's error says the map it was routed by may be out of date: the node could not
/// be reached or its breaker is open (it may have been replaced), or it redirected the call.
/// Such a call marked the map stale; one that goes again after [`Topology::refreshed`] may
/// find the new one.
pub(crate) fn map_may_be_stale(e: &CacheError) -> bool {
    match e {
        CacheError::BreakerOpen(_) => true,
        CacheError::Redis(r) if is_redirection(r) => true,
        e => is_node_failure(e),
    }
}

/// An error reply that says the node does not (or not yet) serve the key's slot as the map
/// said.
pub(crate) fn is_redirection(e: &redis::RedisError) -> bool {
    use redis::ServerErrorKind as K;
    matches!(
        e.kind(),
        redis::ErrorKind::Server(
            K::Moved | K::Ask | K::ReadOnly | K::TryAgain | K::ClusterDown | K::MasterDown
        )
    )
}

/// The node every keyed command of a pipeline was redirected to with `MOVED`, if they all name
/// one (commands without keys, `INFO` and `WAIT` ending a batch, answer wherever they go).
fn moved_whole(
    pipe: &redis::Pipeline,
    replies: &[redis::RedisResult<redis::Value>],
) -> Option<Addr> {
    let mut target = None;
    for (cmd, reply) in pipe.cmd_iter().zip(replies) {
        let keyless = matches!(
            cmd.args_iter().next(),
            Some(redis::Arg::Simple(name)) if [&b"INFO"[..], b"WAIT", b"SCRIPT"]
                .iter()
                .any(|k| name.eq_ignore_ascii_case(k))
        );
        if keyless {
            continue;
        }
        let Err(e) = reply else { return None };
        if e.kind() != redis::ErrorKind::Server(redis::ServerErrorKind::Moved) {
            return None;
        }
        let (host, port) = e.redirect_node()?.0.rsplit_once(':')?;
        let addr = Addr::new(host, port.parse().ok()?);
        if target.get_or_insert_with(|| addr.clone()) != &addr {
            return None;
        }
    }
    target
}

fn is_noscript(reply: &redis::RedisResult<redis::Value>) -> bool {
    matches!(reply, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
}
