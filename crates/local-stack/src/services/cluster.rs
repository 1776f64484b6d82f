//! A Redis Cluster of `redis-server` children, optionally behind delaying proxies.

use std::net::Ipv4Addr;
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
}

impl RedisCluster {
    pub async fn start(primaries: usize) -> Result<RedisCluster, ServiceError> {
        let mut nodes = Vec::with_capacity(primaries);
        for _ in 0..primaries {
            nodes.push(RedisServer::start_with(&CLUSTER_NODE_ARGS).await?);
        }
        Self::create(nodes, Vec::new()).await
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
        let cluster = Self::create(nodes, proxies).await?;
        for proxy in &cluster.proxies {
            proxy.reset();
        }
        Ok(cluster)
    }

    /// Assigns the slots over `nodes` (by their real ports) and waits until every node agrees.
    async fn create(
        nodes: Vec<RedisServer>,
        proxies: Vec<DelayProxy>,
    ) -> Result<RedisCluster, ServiceError> {
        let cli = find_redis_cli()?;
        let out = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
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
        // heard about every other before clients see a consistent slot map.
        let started = Instant::now();
        for node in &nodes {
            while !cluster_ok(node.port()).await {
                if started.elapsed() > Duration::from_secs(20) {
                    return Err(ServiceError::NotReady {
                        what: "redis cluster",
                        port: node.port(),
                        waited: started.elapsed(),
                        log_tail: "cluster_state never became ok".into(),
                    });
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        Ok(RedisCluster { proxies, nodes })
    }

    /// The URL of one node, enough for a cluster client to discover the others: through its
    /// proxy when the cluster has proxies.
    pub fn url(&self) -> String {
        match self.proxies.first() {
            Some(proxy) => proxy.redis_url(),
            None => self.nodes[0].url(),
        }
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
