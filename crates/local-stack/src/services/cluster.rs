//! A Redis Cluster of `redis-server` (or `valkey-server`) children, optionally behind delaying
//! proxies.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use super::*;

/// A Redis Cluster of several primaries (no replicas) on free loopback ports, like ElastiCache
/// with cluster mode enabled: any command whose keys span two hash slots fails with CROSSSLOT,
/// which is what testing against it proves does not happen.
///
/// [`start_with_delay`](Self::start_with_delay) puts a [`DelayProxy`] in front of every node and
/// has the nodes announce the proxies' ports, so a client that discovers the topology (CLUSTER
/// SLOTS, MOVED) only ever talks through the proxies.
#[derive(Debug)]
pub struct RedisCluster {
    // Dropped first: the proxies stop before the nodes do.
    proxies: Vec<DelayProxy>,
    nodes: Vec<RedisServer>,
    /// The name the nodes report and their TLS ports, for a TLS cluster.
    tls: Option<(String, Vec<u16>)>,
}

impl RedisCluster {
    pub async fn start(primaries: usize) -> Result<RedisCluster, ServiceError> {
        Self::start_with(primaries, &[]).await
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments for every node (e.g.
    /// `--timeout 1`).
    pub async fn start_with(
        primaries: usize,
        extra: &[&str],
    ) -> Result<RedisCluster, ServiceError> {
        let mut args: Vec<&str> = CLUSTER_NODE_ARGS.to_vec();
        args.extend(extra);
        let mut nodes = Vec::with_capacity(primaries);
        for _ in 0..primaries {
            nodes.push(RedisServer::start_with(&args).await?);
        }
        Self::create(nodes, Vec::new(), 0).await
    }

    /// `primaries` shards of one primary and `replicas` replicas each, as ElastiCache deploys
    /// with Multi-AZ failover: a primary killed outright is replaced by its replica within about
    /// two seconds (`cluster-node-timeout` is 1 s here), and [`failover`](Self::failover) hands a
    /// primary's role to its replica on purpose.
    pub async fn start_with_replicas(
        primaries: usize,
        replicas: usize,
    ) -> Result<RedisCluster, ServiceError> {
        Self::start_with_replicas_and(primaries, replicas, &[]).await
    }

    /// Like [`start_with_replicas`](Self::start_with_replicas), with extra `redis-server`
    /// arguments for every node, kept for restarts (e.g. `--user ...`, so an ACL user survives
    /// a node's revival).
    pub async fn start_with_replicas_and(
        primaries: usize,
        replicas: usize,
        extra: &[&str],
    ) -> Result<RedisCluster, ServiceError> {
        Self::start_engine(Engine::Redis, primaries, replicas, extra).await
    }

    /// Like [`start_with_replicas_and`](Self::start_with_replicas_and), every node running
    /// `engine`'s server, the cluster created with its CLI.
    pub async fn start_engine(
        engine: Engine,
        primaries: usize,
        replicas: usize,
        extra: &[&str],
    ) -> Result<RedisCluster, ServiceError> {
        let mut args: Vec<&str> = CLUSTER_NODE_ARGS.to_vec();
        args.extend(extra);
        // Fast failure detection, and a replica's first sync without the default 5 s wait.
        args.extend([
            "--cluster-node-timeout",
            "1000",
            "--repl-diskless-sync-delay",
            "0",
        ]);
        let mut nodes = Vec::with_capacity(primaries * (1 + replicas));
        for _ in 0..primaries * (1 + replicas) {
            nodes.push(RedisServer::start_engine(engine, &args).await?);
        }
        Self::create(nodes, Vec::new(), replicas).await
    }

    /// A cluster whose nodes are reached through proxies adding `delay` per round trip
    /// ([`DelayProxy::set_delay`] changes it later; zero still counts round trips). The nodes
    /// announce `127.0.0.1:<proxy port>` to clients and their real bus ports to each other, so
    /// only client traffic is delayed.
    pub async fn start_with_delay(
        primaries: usize,
        delay: Duration,
    ) -> Result<RedisCluster, ServiceError> {
        let mut proxies = Vec::with_capacity(primaries);
        let mut nodes = Vec::with_capacity(primaries);
        for _ in 0..primaries {
            let proxy = DelayProxy::listen(delay).await?;
            // The bus port is chosen here rather than derived (client port + 10000, which can
            // be past 65535), so it can be announced before the node starts.
            let bus_port = free_port().to_string();
            let proxy_port = proxy.port().to_string();
            let mut args: Vec<&str> = CLUSTER_NODE_ARGS.to_vec();
            args.extend([
                "--cluster-port",
                &bus_port,
                "--cluster-announce-ip",
                "127.0.0.1",
                "--cluster-announce-port",
                &proxy_port,
                "--cluster-announce-bus-port",
                &bus_port,
            ]);
            let node = RedisServer::start_with(&args).await?;
            proxy.set_upstream((Ipv4Addr::LOCALHOST, node.port()).into());
            proxies.push(proxy);
            nodes.push(node);
        }
        let cluster = Self::create(nodes, proxies, 0).await?;
        for proxy in &cluster.proxies {
            proxy.reset();
        }
        Ok(cluster)
    }

    /// Assigns the slots over `nodes` (by their real ports) and waits until every node agrees.
    async fn create(
        nodes: Vec<RedisServer>,
        proxies: Vec<DelayProxy>,
        replicas: usize,
    ) -> Result<RedisCluster, ServiceError> {
        // The nodes' own CLI: valkey-cli's `--cluster create` is redis-cli's.
        let cli = nodes[0].engine().cli()?;
        let out = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await?;
        let first_port = nodes[0].port();
        if !out.status.success() {
            return Err(ServiceError::NotReady {
                what: "redis cluster",
                port: first_port,
                waited: Duration::ZERO,
                log_tail: String::from_utf8_lossy(&out.stdout).into_owned(),
            });
        }
        // `--cluster create` returns once the slots are assigned; every node must also have
        // heard about every other before clients see a consistent slot map, and (the replicas
        // are told whom to follow last) know which nodes are replicas: a test that asks for a
        // primary's replica at once once found only one of three.
        let replicas_in_all = nodes.len() / (1 + replicas) * replicas;
        let agrees = |port: u16| async move {
            cluster_ok(port).await
                && command(port, &["CLUSTER", "NODES"])
                    .await
                    .is_ok_and(|nodes| {
                        parse_roles(&nodes).iter().filter(|r| !r.primary).count() == replicas_in_all
                    })
        };
        let started = Instant::now();
        for node in &nodes {
            while !agrees(node.port()).await {
                if started.elapsed() > Duration::from_secs(20) {
                    return Err(ServiceError::NotReady {
                        what: "redis cluster",
                        port: node.port(),
                        waited: started.elapsed(),
                        log_tail: "cluster_state never became ok with every replica known".into(),
                    });
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        Ok(RedisCluster {
            proxies,
            nodes,
            tls: None,
        })
    }

    /// The URL of one node, enough for a cluster client to discover the others: through its
    /// proxy when the cluster has proxies.
    pub fn url(&self) -> String {
        match self.proxies.first() {
            Some(proxy) => proxy.redis_url(),
            None => self.nodes[0].url(),
        }
    }

    /// A cluster of `primaries` nodes that talk TLS to clients and to each other, and report
    /// `hostname` (not their IP) to clients, as ElastiCache with in-transit encryption does: a
    /// client must then verify each node's certificate against that name. `cert`, `key` and
    /// `ca` are PEM files; the plain ports stay open for setup and health checks.
    pub async fn start_tls(
        primaries: usize,
        cert: &Path,
        key: &Path,
        ca: &Path,
        hostname: &str,
    ) -> Result<RedisCluster, ServiceError> {
        let (cert, key, ca) = (
            cert.to_string_lossy(),
            key.to_string_lossy(),
            ca.to_string_lossy(),
        );
        let mut nodes = Vec::with_capacity(primaries);
        let mut tls_ports = Vec::with_capacity(primaries);
        for _ in 0..primaries {
            let tls_port = free_port().to_string();
            let mut args: Vec<&str> = CLUSTER_NODE_ARGS.to_vec();
            args.extend([
                "--tls-port",
                &tls_port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
                "--tls-cluster",
                "yes",
                "--cluster-announce-hostname",
                hostname,
                "--cluster-preferred-endpoint-type",
                "hostname",
            ]);
            nodes.push(RedisServer::start_with(&args).await?);
            tls_ports.push(tls_port.parse().expect("a port"));
        }
        let mut cluster = Self::create(nodes, Vec::new(), 0).await?;
        cluster.tls = Some((hostname.to_owned(), tls_ports));
        Ok(cluster)
    }

    /// `rediss://<hostname>:<TLS port>` of the first node, for a cluster started with TLS.
    pub fn tls_url(&self) -> Option<String> {
        let (host, ports) = self.tls.as_ref()?;
        Some(format!("rediss://{host}:{}", ports[0]))
    }

    /// Each node's role now, from the cluster's own view (`CLUSTER NODES` of a live node).
    pub async fn roles(&self) -> Result<Vec<Role>, ServiceError> {
        let mut last = None;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            match command(node.port(), &["CLUSTER", "NODES"]).await {
                Ok(nodes) => return Ok(parse_roles(&nodes)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| io::Error::other("no node is running").into(), Into::into))
    }

    /// The running primary with the lowest port that is none of `except`.
    pub async fn primary_except(&self, except: &[u16]) -> Result<u16, ServiceError> {
        self.roles()
            .await?
            .iter()
            .filter(|r| r.primary && !r.failed && !except.contains(&r.port))
            .map(|r| r.port)
            .min()
            .ok_or_else(|| io::Error::other("no other primary").into())
    }

    /// The replica of the primary on `primary`.
    pub async fn replica_of(&self, primary: u16) -> Result<u16, ServiceError> {
        self.roles()
            .await?
            .iter()
            .find(|r| r.replica_of == Some(primary))
            .map(|r| r.port)
            .ok_or_else(|| io::Error::other(format!(":{primary} has no replica")).into())
    }

    /// The primary serving `slot` now.
    pub async fn primary_of_slot(&self, slot: u16) -> Result<u16, ServiceError> {
        self.roles()
            .await?
            .iter()
            .find(|r| r.primary && !r.failed && r.serves(slot))
            .map(|r| r.port)
            .ok_or_else(|| io::Error::other(format!("no primary serves slot {slot}")).into())
    }

    /// Waits (up to 30 s) until the replica on `port` reports its link to its primary up: in
    /// sync, able to confirm writes.
    pub async fn await_in_sync(&self, port: u16) -> Result<(), ServiceError> {
        let started = Instant::now();
        loop {
            let info = command(port, &["INFO", "replication"]).await?;
            if info.contains("master_link_status:up") {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(ServiceError::NotReady {
                    what: "redis replica sync",
                    port,
                    waited: started.elapsed(),
                    log_tail: info,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Hands the primary role of `replica`'s shard to it (`CLUSTER FAILOVER` on the replica, the
    /// coordinated failover of a maintenance or a test), and waits until the cluster agrees.
    pub async fn failover(&self, replica: u16) -> Result<(), ServiceError> {
        command(replica, &["CLUSTER", "FAILOVER"]).await?;
        self.await_role(replica, true).await
    }

    /// Kills the node on `port` outright (SIGKILL, no goodbye), as a lost instance; its replica
    /// is promoted by the cluster itself. Returns that replica's port once it is primary.
    pub async fn kill(&mut self, port: u16) -> Result<u16, ServiceError> {
        let replica = self.kill_now(port).await?;
        self.await_role(replica, true).await?;
        Ok(replica)
    }

    /// [`kill`](Self::kill) without waiting for the promotion: returns the port of the replica
    /// the cluster will promote, as soon as the node is gone.
    pub async fn kill_now(&mut self, port: u16) -> Result<u16, ServiceError> {
        let replica = self
            .roles()
            .await?
            .into_iter()
            .find(|r| r.replica_of == Some(port))
            .map(|r| r.port);
        let node = self.nodes.iter_mut().find(|n| n.port() == port);
        node.expect("a node of this cluster").stop().await;
        replica.ok_or_else(|| io::Error::other("the node has no replica").into())
    }

    /// Starts a killed node again, on its port and with its cluster state: it rejoins as a
    /// replica of whichever node took its place.
    pub async fn revive(&mut self, port: u16) -> Result<(), ServiceError> {
        let node = self.nodes.iter_mut().find(|n| n.port() == port);
        node.expect("a node of this cluster").restart().await?;
        self.await_role(port, false).await
    }

    /// Stalls the node on `port` (SIGSTOP) until [`resume`](Self::resume): its connections stay
    /// open and nothing answers. Longer than `cluster-node-timeout`, a stalled primary is
    /// failed over to its replica, and rejoins as a replica once resumed.
    pub fn stall(&self, port: u16) {
        self.node(port).expect("a node of this cluster").stall();
    }

    /// Lets a stalled node go on.
    pub fn resume(&self, port: u16) {
        self.node(port).expect("a node of this cluster").resume();
    }

    /// Cuts `replica`'s replication link and keeps it cut, as a partition between a primary and
    /// its replica would: the replica's `masteruser` becomes a user no node knows, its link to
    /// the primary is closed, and every attempt to sync again fails `AUTH`. The primary keeps
    /// taking writes the replica never sees (a `WAIT` for one replica counts none), so a primary
    /// lost now takes them with it and the replica is promoted without them. Returns once the
    /// replica reports its link down.
    pub async fn cut_replication(&self, replica: u16) -> Result<(), ServiceError> {
        command(
            replica,
            &[
                "CONFIG",
                "SET",
                "masteruser",
                CUT_USER,
                "masterauth",
                CUT_USER,
            ],
        )
        .await?;
        command(replica, &["CLIENT", "KILL", "TYPE", "master"]).await?;
        let started = Instant::now();
        loop {
            let info = command(replica, &["INFO", "replication"]).await?;
            if info.contains("master_link_status:down") {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(ServiceError::NotReady {
                    what: "redis replication cut",
                    port: replica,
                    waited: started.elapsed(),
                    log_tail: info,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Undoes [`cut_replication`](Self::cut_replication) on `port`: a replica syncs again, a
    /// node promoted meanwhile is ready to sync should it become a replica again.
    pub async fn mend_replication(&self, port: u16) -> Result<(), ServiceError> {
        command(port, &["CONFIG", "SET", "masteruser", "", "masterauth", ""]).await?;
        Ok(())
    }

    /// `master_repl_offset` of `INFO replication`: how far into its shard's replication stream
    /// the node is, produced (a primary) or applied (a replica).
    pub async fn replication_offset(&self, port: u16) -> Result<u64, ServiceError> {
        let info = command(port, &["INFO", "replication"]).await?;
        info.lines()
            .find_map(|l| l.strip_prefix("master_repl_offset:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("no master_repl_offset in {info}")).into())
    }

    /// Waits (up to 20 s) until the cluster sees `port` as a primary (or a replica) and every
    /// running node reports the cluster healthy.
    pub async fn await_role(&self, port: u16, primary: bool) -> Result<(), ServiceError> {
        let started = Instant::now();
        loop {
            let roles = self.roles().await.unwrap_or_default();
            let placed = roles.iter().any(|r| r.port == port && r.primary == primary);
            let mut healthy = placed;
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                healthy = healthy && cluster_ok(node.port()).await;
            }
            if healthy {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(20) {
                return Err(ServiceError::NotReady {
                    what: "redis cluster failover",
                    port,
                    waited: started.elapsed(),
                    log_tail: format!("{roles:?}"),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The node listening on `port` (a real port, as [`ports`](Self::ports) lists them).
    pub fn node(&self, port: u16) -> Option<&RedisServer> {
        self.nodes.iter().find(|n| n.port() == port)
    }

    /// The nodes' real ports (not delayed).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// The proxies in front of the nodes, in node order (empty unless started with a delay).
    pub fn proxies(&self) -> &[DelayProxy] {
        &self.proxies
    }

    /// Round trips through all the proxies since the last reset.
    pub fn round_trips(&self) -> u64 {
        self.proxies.iter().map(DelayProxy::round_trips).sum()
    }

    /// Resets every proxy's counters.
    pub fn reset_counters(&self) {
        self.proxies.iter().for_each(DelayProxy::reset);
    }

    /// Sets every proxy's delay.
    pub fn set_delay(&self, delay: Duration) {
        for proxy in &self.proxies {
            proxy.set_delay(delay);
        }
    }
}

/// A node's place in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub port: u16,
    pub primary: bool,
    /// The port of its primary, for a replica.
    pub replica_of: Option<u16>,
    /// Whether the cluster considers it failed.
    pub failed: bool,
    /// The hash slots it serves, as first and last slot of each range (a primary's).
    pub slots: Vec<(u16, u16)>,
}

impl Role {
    /// Whether it serves `slot`.
    pub fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|(first, last)| (*first..=*last).contains(&slot))
    }
}

/// `CLUSTER NODES` lines: `<id> <ip:port@bus> <flags> <primary id or -> <ping> <pong> <epoch>
/// <link> <slot range>...`, a range `first-last` or one slot (`[...]` marks a slot migrating).
fn parse_roles(nodes: &str) -> Vec<Role> {
    let lines: Vec<Vec<&str>> = nodes
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| f.len() >= 4)
        .collect();
    let port_of =
        |addr: &str| -> Option<u16> { addr.split('@').next()?.rsplit(':').next()?.parse().ok() };
    let port_of_id = |id: &str| {
        lines
            .iter()
            .find(|f| f[0] == id)
            .and_then(|f| port_of(f[1]))
    };
    lines
        .iter()
        .filter_map(|f| {
            Some(Role {
                port: port_of(f[1])?,
                primary: f[2].contains("master"),
                replica_of: (f[3] != "-").then(|| port_of_id(f[3])).flatten(),
                // `fail` (or `fail?`) among the flags; not `nofailover`, which also holds "fail".
                failed: f[2]
                    .split(',')
                    .any(|flag| flag == "fail" || flag == "fail?"),
                slots: f
                    .iter()
                    .skip(8)
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|n| (n, n)),
                    })
                    .collect(),
            })
        })
        .collect()
}

/// One command over a plain connection, its whole reply as text (a simple or bulk string).
async fn command(port: u16, args: &[&str]) -> io::Result<String> {
    let attempt = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            if let Some(text) = complete(&reply) {
                return text;
            }
        }
        Err(io::Error::other(
            "the connection closed before the reply was complete",
        ))
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// The reply's text once all of it has arrived: `None` while a bulk string is incomplete.
fn complete(reply: &[u8]) -> Option<io::Result<String>> {
    let text = String::from_utf8_lossy(reply);
    let (first, rest) = text.split_once("\r\n")?;
    match first.as_bytes().first() {
        Some(b'+') => Some(Ok(first[1..].to_owned())),
        Some(b'-') => Some(Err(io::Error::other(first[1..].to_owned()))),
        Some(b'$') => {
            let len: usize = first[1..].parse().ok()?;
            (rest.len() >= len).then(|| Ok(rest[..len].to_owned()))
        }
        _ => Some(Ok(text.into_owned())),
    }
}

/// The `masteruser` (and password) of a replica whose link [`RedisCluster::cut_replication`]
/// cut: no node has such a user.
const CUT_USER: &str = "replication-cut";

const CLUSTER_NODE_ARGS: [&str; 6] = [
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "5000",
];

async fn cluster_ok(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream.write_all(b"CLUSTER INFO\r\n").await?;
        let mut buf = vec![0; 4096];
        let n = stream.read(&mut buf).await?;
        Ok::<bool, io::Error>(String::from_utf8_lossy(&buf[..n]).contains("cluster_state:ok"))
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, attempt).await,
        Ok(Ok(true))
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn roles_and_slots_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 [5461->-b2]
b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922 16383
c3 127.0.0.1:7002@17002 slave a1 0 0 1 connected
d4 127.0.0.1:7003@17003 master,fail - 0 0 3 disconnected
";
        let roles = super::parse_roles(nodes);
        assert_eq!(roles.len(), 4);
        assert_eq!((roles[0].port, roles[0].primary), (7000, true));
        assert_eq!(roles[0].slots, vec![(0, 5460)]);
        assert_eq!(roles[1].slots, vec![(5461, 10922), (16383, 16383)]);
        assert!(roles[1].serves(16383) && !roles[1].serves(0));
        assert_eq!((roles[2].replica_of, roles[2].slots.len()), (Some(7000), 0));
        assert!(roles[3].failed);
    }
}
