//! A circuit breaker per cache node, per process.
//!
//! A node that has stopped answering (a primary mid-failover, a node being replaced, a stalled
//! process) costs every call its whole `REDIS_TIMEOUT_MS` before the caller gives up. After
//! `REDIS_BREAKER_FAILURES` consecutive failed calls to one node its breaker opens, and for
//! `REDIS_BREAKER_OPEN_MS` every call for a key on that node fails at once with
//! [`CacheError::BreakerOpen`], without any network I/O: the read path answers from the table,
//! the invalidator reports those records for retry. Then one call goes through as the trial
//! (half-open; the calls beside it still fail fast): its success closes the breaker, its
//! failure opens it again for another interval. So a stalled node costs an environment a few
//! timeouts, then one trial call per interval, and its recovery is noticed within an interval.
//!
//! Only what says the node is unreachable counts as a failure: a timeout, a failed connect, a
//! dropped connection, an I/O error. An error reply (NOSCRIPT, a script's error, READONLY, a
//! refused ACL) proves the node answered and counts as a success. A call that gave up waiting
//! for the first connection, still forming (a cold start), says nothing either way: that
//! attempt has its own budget (`REDIS_CONNECT_TIMEOUT_MS`) and its failure counts when it comes;
//! counting the waits would open the breaker on every slow cold start and send the environment's
//! reads to the table for an interval after the connection was up.
//!
//! The state is per process (one Lambda execution environment), kept in memory: each
//! environment finds out by itself, at the price of its own few timeouts.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::Addr;
use crate::cache::CacheError;
use crate::config::BreakerSettings;

/// Whether `e` says the node could not be reached, as opposed to an answer it sent.
pub(crate) fn is_node_failure(e: &CacheError) -> bool {
    match e {
        CacheError::Timeout(_) | CacheError::Connect(_) => true,
        CacheError::Redis(e) => {
            e.is_io_error()
                || e.is_connection_dropped()
                || e.is_timeout()
                || e.is_connection_refusal()
                || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
        }
        CacheError::Connecting(_)
        | CacheError::Unconfirmed { .. }
        | CacheError::Unexpected(_)
        | CacheError::BreakerOpen(_) => false,
    }
}

/// What a call's outcome says about its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// It answered (an error reply included).
    Answered,
    /// It could not be reached.
    Failed,
    /// Nothing: the call never reached the point of talking to it (see the module's doc).
    Unknown,
}

impl Verdict {
    fn of<T>(outcome: &Result<T, CacheError>) -> Self {
        match outcome {
            Ok(_) => Verdict::Answered,
            Err(e) if is_node_failure(e) => Verdict::Failed,
            Err(CacheError::Connecting(_) | CacheError::BreakerOpen(_)) => Verdict::Unknown,
            Err(_) => Verdict::Answered,
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Calls go through; `failures` consecutive ones have failed.
    Closed { failures: u32 },
    /// Calls fail fast until `until`; the first after it is the trial.
    Open { until: Instant },
    /// The trial is in flight; every other call fails fast.
    Trial,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Changes at every transition, so a call admitted before one cannot move the breaker
    /// after it (a slow call that finally fails must not count against a breaker that has
    /// closed since, nor a late success close one that has opened).
    generation: u64,
    /// When the breaker last opened from closed, for the log line that closes it.
    opened_at: Option<Instant>,
}

/// One node's breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    node: String,
    settings: BreakerSettings,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(node: impl Into<String>, settings: BreakerSettings) -> Self {
        Self {
            node: node.into(),
            settings,
            state: Mutex::new(State {
                phase: Phase::Closed { failures: 0 },
                generation: 0,
                opened_at: None,
            }),
        }
    }

    fn enabled(&self) -> bool {
        self.settings.failures > 0
    }

    /// The right to make one call to the node, or [`CacheError::BreakerOpen`] at once.
    pub fn admit(self: &Arc<Self>) -> Result<Permit, CacheError> {
        if !self.enabled() {
            return Ok(Permit::free());
        }
        // A std Mutex: held for a few instructions, never across an await.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let trial = match state.phase {
            Phase::Closed { .. } => false,
            Phase::Open { until } if Instant::now() >= until => {
                state.phase = Phase::Trial;
                state.generation += 1;
                true
            }
            Phase::Open { .. } | Phase::Trial => {
                return Err(CacheError::BreakerOpen(self.node.clone()));
            }
        };
        Ok(Permit {
            breaker: Some(Arc::clone(self)),
            generation: state.generation,
            trial,
        })
    }

    /// The outcome of a call admitted in `generation`.
    fn record(&self, generation: u64, trial: bool, verdict: Verdict) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.generation != generation {
            return;
        }
        let now = Instant::now();
        let open_for = self.settings.open_for;
        // A trial that learnt nothing cannot close the breaker.
        let failed = match verdict {
            Verdict::Answered => false,
            Verdict::Failed => true,
            Verdict::Unknown if trial => true,
            Verdict::Unknown => return,
        };
        match (state.phase, trial, failed) {
            (Phase::Closed { .. }, false, false) => state.phase = Phase::Closed { failures: 0 },
            (Phase::Closed { failures }, false, true) => {
                let failures = failures + 1;
                if failures < self.settings.failures {
                    state.phase = Phase::Closed { failures };
                    return;
                }
                state.phase = Phase::Open {
                    until: now + open_for,
                };
                state.generation += 1;
                state.opened_at = Some(now);
                tracing::warn!(
                    node = %self.node,
                    failures,
                    open_for_ms = open_for.as_millis() as u64,
                    "cache node unreachable: circuit breaker open, calls for its keys bypass it \
                     (a trial call every interval)"
                );
            }
            (Phase::Trial, true, false) => {
                state.phase = Phase::Closed { failures: 0 };
                state.generation += 1;
                let down_ms = state
                    .opened_at
                    .take()
                    .map_or(0, |at| now.duration_since(at).as_millis() as u64);
                tracing::info!(
                    node = %self.node,
                    down_ms,
                    "cache node answers again: circuit breaker closed"
                );
            }
            (Phase::Trial, true, true) => {
                state.phase = Phase::Open {
                    until: now + open_for,
                };
                state.generation += 1;
                // Once per interval for as long as the node is down: not worth a warning each.
                tracing::debug!(node = %self.node, "trial call failed: circuit breaker open again");
            }
            // A generation is either closed (plain permits) or a trial (one trial permit).
            _ => {}
        }
    }

    #[cfg(test)]
    fn phase(&self) -> Phase {
        self.state.lock().unwrap().phase
    }
}

/// An admitted call. Report its outcome with [`Permit::record`]; a trial dropped without one
/// (its caller gave up on it) counts as failed, so the breaker cannot stay half-open for good.
#[must_use = "a permit's outcome moves the breaker"]
pub(crate) struct Permit {
    breaker: Option<Arc<Breaker>>,
    generation: u64,
    trial: bool,
}

impl Permit {
    /// A permit that records nothing: the breaker is off.
    fn free() -> Self {
        Self {
            breaker: None,
            generation: 0,
            trial: false,
        }
    }

    /// Whether this call is the trial of a breaker that was open: the first to a node that had
    /// stopped answering, whose answer the caller may not trust (fencing, see `call.rs`).
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    /// Records the call's outcome.
    pub fn record<T>(mut self, outcome: &Result<T, CacheError>) {
        if let Some(breaker) = self.breaker.take() {
            breaker.record(self.generation, self.trial, Verdict::of(outcome));
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(breaker) = self.breaker.take() {
            if self.trial {
                breaker.record(self.generation, true, Verdict::Failed);
            }
        }
    }
}

/// The breakers of one cache client, one per node, made on first use and kept while the node
/// is in the topology (`topology.rs` calls [`Breakers::keep`] with each new map): a node gone
/// from the cluster takes its breaker with it, so an open breaker always names a node that
/// calls may still go to.
#[derive(Debug)]
pub(crate) struct Breakers {
    settings: BreakerSettings,
    nodes: Mutex<HashMap<Addr, Arc<Breaker>>>,
}

impl Breakers {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            nodes: Mutex::default(),
        }
    }

    pub fn of(&self, node: &Addr) -> Arc<Breaker> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(breaker) = nodes.get(node) {
            return Arc::clone(breaker);
        }
        let breaker = Arc::new(Breaker::new(node.to_string(), self.settings));
        nodes.insert(node.clone(), Arc::clone(&breaker));
        breaker
    }

    /// Whether calls to `node` fail fast now: its breaker is open and its interval has not
    /// passed, or its trial is in flight. One whose interval has passed is due a trial, which
    /// is not "open": the next call goes.
    pub fn is_open(&self, node: &Addr) -> bool {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.get(node).is_some_and(|b| {
            match b.state.lock().unwrap_or_else(|e| e.into_inner()).phase {
                Phase::Open { until } => Instant::now() < until,
                Phase::Trial => true,
                Phase::Closed { .. } => false,
            }
        })
    }

    /// Keeps the breakers of `nodes` only.
    pub fn keep(&self, nodes: &HashSet<Addr>) {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|addr, _| nodes.contains(addr));
    }

    /// When the latest of `nodes`' open breakers admits its trial (at most one open interval
    /// from now); `None` when none of them is open.
    pub fn trial_due(&self, nodes: &[Addr]) -> Option<Instant> {
        let latest = Instant::now() + self.settings.open_for;
        nodes
            .iter()
            .filter_map(|node| {
                match self
                    .of(node)
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .phase
                {
                    Phase::Open { until } => Some(until.min(latest)),
                    // Another call is its trial: the next interval's at most.
                    Phase::Trial => Some(latest),
                    Phase::Closed { .. } => None,
                }
            })
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const OPEN: Duration = Duration::from_millis(1000);

    fn breaker(failures: u32) -> Arc<Breaker> {
        Arc::new(Breaker::new(
            "10.0.0.1:6379",
            BreakerSettings {
                failures,
                open_for: OPEN,
            },
        ))
    }

    fn timeout() -> Result<(), CacheError> {
        Err(CacheError::Timeout(Duration::from_millis(100)))
    }

    fn fail(b: &Arc<Breaker>) {
        b.admit().expect("admitted").record(&timeout());
    }

    fn open(b: &Arc<Breaker>) -> bool {
        matches!(b.admit(), Err(CacheError::BreakerOpen(node)) if node == "10.0.0.1:6379")
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_fails_fast_while_open() {
        let b = breaker(3);
        fail(&b);
        fail(&b);
        // A success in between starts the count again.
        b.admit().unwrap().record(&Ok(()));
        fail(&b);
        fail(&b);
        assert!(!open(&b), "opened after 2 consecutive failures");
        fail(&b);
        assert!(open(&b), "still closed after 3 consecutive failures");
        tokio::time::advance(OPEN - Duration::from_millis(1)).await;
        assert!(open(&b), "closed before the interval");
    }

    #[tokio::test(start_paused = true)]
    async fn one_trial_after_the_interval_closes_it_on_success() {
        let b = breaker(3);
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(OPEN).await;
        let trial = b.admit().expect("the trial goes through");
        assert!(trial.is_trial());
        // Concurrent calls still fail fast while the trial is in flight.
        assert!(open(&b));
        assert!(open(&b));
        trial.record(&Ok(()));
        assert_eq!(b.phase(), Phase::Closed { failures: 0 });
        let next = b.admit().expect("closed");
        assert!(!next.is_trial());
        next.record(&Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_opens_it_for_another_interval() {
        let b = breaker(3);
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(OPEN).await;
        b.admit().unwrap().record(&timeout());
        assert!(open(&b));
        tokio::time::advance(OPEN / 2).await;
        assert!(open(&b), "re-opened for less than an interval");
        tokio::time::advance(OPEN / 2).await;
        let trial = b.admit().expect("the next trial");
        assert!(trial.is_trial());
        trial.record(&Ok(()));
        assert_eq!(b.phase(), Phase::Closed { failures: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_trial_dropped_without_an_outcome_counts_as_failed() {
        let b = breaker(1);
        fail(&b);
        tokio::time::advance(OPEN).await;
        drop(b.admit().unwrap());
        assert!(matches!(b.phase(), Phase::Open { .. }));
        assert!(open(&b));
    }

    #[tokio::test(start_paused = true)]
    async fn error_replies_are_not_failures() {
        let b = breaker(1);
        let replied = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::NoScript),
            "NOSCRIPT",
        ));
        b.admit()
            .unwrap()
            .record::<()>(&Err(CacheError::Redis(replied)));
        b.admit()
            .unwrap()
            .record::<()>(&Err(CacheError::Unexpected("a script's error".into())));
        assert_eq!(b.phase(), Phase::Closed { failures: 0 });
        let dropped =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        b.admit()
            .unwrap()
            .record::<()>(&Err(CacheError::Redis(dropped)));
        assert!(open(&b), "a dropped connection is a failure");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_the_first_connection_says_nothing_but_fails_a_trial() {
        let b = breaker(2);
        let connecting = || Err::<(), _>(CacheError::Connecting(Duration::from_millis(100)));
        fail(&b);
        for _ in 0..5 {
            b.admit().unwrap().record(&connecting());
        }
        assert_eq!(b.phase(), Phase::Closed { failures: 1 }, "counted or reset");
        fail(&b);
        assert!(open(&b));
        tokio::time::advance(OPEN).await;
        b.admit().unwrap().record(&connecting());
        assert!(open(&b), "a trial that learnt nothing closed the breaker");
    }

    #[tokio::test(start_paused = true)]
    async fn late_outcomes_of_calls_admitted_before_a_transition_are_ignored() {
        let b = breaker(2);
        // Four calls in flight together; two fail and open the breaker.
        let (first, second) = (b.admit().unwrap(), b.admit().unwrap());
        let (late_success, late_failure) = (b.admit().unwrap(), b.admit().unwrap());
        first.record(&timeout());
        second.record(&timeout());
        assert!(open(&b));
        // The third's success arrives after: it closes nothing.
        late_success.record(&Ok(()));
        assert!(open(&b));
        tokio::time::advance(OPEN).await;
        b.admit().unwrap().record(&Ok(()));
        // The fourth's failure arrives after a trial closed the breaker: it does not count.
        late_failure.record(&timeout());
        fail(&b);
        assert!(
            !open(&b),
            "opened by a failure of a call admitted before it closed"
        );
        fail(&b);
        assert!(open(&b));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_failures_disables_it() {
        let b = breaker(0);
        for _ in 0..10 {
            fail(&b);
        }
        assert!(!open(&b));
    }

    fn addr(s: &str) -> Addr {
        let (host, port) = s.split_once(':').unwrap();
        Addr::new(host, port.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn breakers_are_per_node_and_follow_the_nodes_kept() {
        let breakers = Breakers::new(BreakerSettings {
            failures: 1,
            open_for: OPEN,
        });
        let (a, b) = (addr("a:1"), addr("b:2"));
        breakers.of(&a).admit().unwrap().record(&timeout());
        assert!(breakers.is_open(&a));
        assert!(matches!(
            breakers.of(&a).admit(),
            Err(CacheError::BreakerOpen(_))
        ));
        breakers.of(&b).admit().unwrap().record(&Ok(()));
        assert!(!breakers.is_open(&b));
        // A passed interval is a trial due, not an open breaker.
        tokio::time::advance(OPEN).await;
        assert!(!breakers.is_open(&a), "a trial due counted as open");
        assert_eq!(
            breakers.trial_due(&[a.clone(), b.clone()]),
            Some(Instant::now())
        );
        // A node gone from the map takes its breaker with it.
        breakers.of(&a).admit().unwrap().record(&timeout());
        assert!(breakers.is_open(&a));
        breakers.keep(&[b.clone()].into_iter().collect());
        assert!(!breakers.is_open(&a), "a breaker outlived its node");
        assert_eq!(breakers.trial_due(&[b]), None);
    }
}
