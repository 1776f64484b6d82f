//! What a cluster says of itself, parsed: `CLUSTER SLOTS` (each slot range's primary and
//! replicas) and a primary's `INFO replication` (the replicas it has attached, and how far
//! behind each is).

use super::Addr;
use crate::cache::CacheError;

/// A replica, as `CLUSTER SLOTS` names it, and its IP address when the cluster reports a host
/// name (what `INFO replication` names it by).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub addr: Addr,
    pub ip: Option<String>,
}

/// One shard: its primary and its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub primary: Addr,
    pub replicas: Vec<Replica>,
}

/// The cluster's slot ranges and the shard serving each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    pub shards: Vec<Shard>,
    /// First and last slot, and the index of its shard, in slot order.
    ranges: Vec<(u16, u16, usize)>,
}

impl SlotMap {
    /// The shard serving `slot`, by index into [`SlotMap::shards`]; `None` for a slot no shard
    /// serves (a range whose primary is unknown).
    pub fn shard_of(&self, slot: u16) -> Option<usize> {
        let at = self.ranges.partition_point(|(_, end, _)| *end < slot);
        self.ranges
            .get(at)
            .filter(|(start, _, _)| *start <= slot)
            .map(|(_, _, shard)| *shard)
    }

    /// Every primary, in the map's order.
    pub fn primaries(&self) -> impl Iterator<Item = &Addr> {
        self.shards.iter().map(|s| &s.primary)
    }

    /// Every node, primaries and replicas.
    pub fn nodes(&self) -> impl Iterator<Item = &Addr> {
        self.shards
            .iter()
            .flat_map(|s| std::iter::once(&s.primary).chain(s.replicas.iter().map(|r| &r.addr)))
    }
}

/// The slot map of a `CLUSTER SLOTS` reply from a node whose host is `answering`. As redis-rs
/// reads it, and as the command's documentation says: a NULL or empty host (what
/// `cluster-preferred-endpoint-type unknown-endpoint` reports), or a wildcard one (`0.0.0.0`,
/// `::`), is the answering node's host, with the port reported; `?` is a node whose endpoint is
/// unknown: a replica so named is left out, and so is a range whose primary is. A node's fourth
/// field (Redis 7) carries its IP when the endpoint is a host name.
pub fn parse_cluster_slots(reply: &redis::Value, answering: &str) -> Result<SlotMap, CacheError> {
    let unexpected = || CacheError::Unexpected(format!("CLUSTER SLOTS replied {reply:?}"));
    let redis::Value::Array(ranges) = reply else {
        return Err(unexpected());
    };
    let mut map = SlotMap::default();
    for range in ranges {
        let redis::Value::Array(fields) = range else {
            return Err(unexpected());
        };
        let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
            (fields.first(), fields.get(1))
        else {
            return Err(unexpected());
        };
        let mut nodes = fields[2..].iter().map(|node| node_of(node, answering));
        let Some(primary) = nodes.next().transpose().map_err(|_| unexpected())? else {
            return Err(unexpected());
        };
        let Some(primary) = primary else { continue };
        let replicas: Vec<Replica> = nodes
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| unexpected())?
            .into_iter()
            .flatten()
            .collect();
        let shard = match map.shards.iter().position(|s| s.primary == primary.addr) {
            Some(shard) => shard,
            None => {
                map.shards.push(Shard {
                    primary: primary.addr,
                    replicas,
                });
                map.shards.len() - 1
            }
        };
        map.ranges.push((*start as u16, *end as u16, shard));
    }
    map.ranges.sort_unstable();
    Ok(map)
}

/// One node of a `CLUSTER SLOTS` range; `None` for an unknown endpoint (`?`).
fn node_of(node: &redis::Value, answering: &str) -> Result<Option<Replica>, ()> {
    let redis::Value::Array(fields) = node else {
        return Err(());
    };
    let host = match fields.first() {
        Some(redis::Value::Nil) => answering.to_owned(),
        Some(h) => {
            let host: String = redis::from_redis_value(h.clone()).map_err(drop)?;
            match host.as_str() {
                "" | "0.0.0.0" | "::" => answering.to_owned(),
                "?" => return Ok(None),
                _ => host,
            }
        }
        None => return Err(()),
    };
    let Some(redis::Value::Int(port)) = fields.get(1) else {
        return Err(());
    };
    // Networking metadata: a flat array (RESP2) or a map (RESP3) of name, value.
    let pairs: Vec<(redis::Value, redis::Value)> = match fields.get(3) {
        Some(redis::Value::Array(flat)) => flat
            .chunks(2)
            .filter_map(|p| Some((p.first()?.clone(), p.get(1)?.clone())))
            .collect(),
        Some(redis::Value::Map(map)) => map.clone(),
        _ => Vec::new(),
    };
    let ip = pairs.into_iter().find_map(|(k, v)| {
        let k: String = redis::from_redis_value(k).ok()?;
        (k == "ip").then(|| redis::from_redis_value::<String>(v).ok())?
    });
    Ok(Some(Replica {
        addr: Addr::new(host, *port as u16),
        ip,
    }))
}

/// A replica as its primary's `INFO replication` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub ip: String,
    pub port: u16,
    /// `state=online`: attached and streaming, so able to acknowledge a `WAIT` and holding
    /// everything the primary acknowledged before. One still loading its full sync
    /// (`wait_bgsave`, `send_bulk`) is listed but not online; one whose link is down is not
    /// listed at all.
    pub online: bool,
    /// Seconds since its last acknowledgement (replicas acknowledge every second).
    pub lag: u64,
}

/// What a node's `INFO replication` says: its role, and for a primary, its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub primary: bool,
    pub replicas: Vec<Attached>,
}

impl Replication {
    /// How many replicas are `state=online`.
    pub fn online(&self) -> u32 {
        self.replicas.iter().filter(|r| r.online).count() as u32
    }
}

/// An `INFO replication` reply.
pub fn parse_replication(info: &redis::Value) -> Result<Replication, CacheError> {
    let text: String = redis::from_redis_value(info.clone())
        .map_err(|e| CacheError::Unexpected(format!("INFO replication: {e}")))?;
    let mut replication = Replication {
        primary: false,
        replicas: Vec::new(),
    };
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(role) = line.strip_prefix("role:") {
            replication.primary = role == "master";
        }
        // `slave0:ip=10.0.0.2,port=6379,state=online,offset=100,lag=0`
        let Some((name, fields)) = line.split_once(':') else {
            continue;
        };
        let numbered = name
            .strip_prefix("slave")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !numbered {
            continue;
        }
        let field = |want: &str| {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(want)?.strip_prefix('='))
        };
        let (Some(ip), Some(Ok(port))) = (field("ip"), field("port").map(str::parse)) else {
            continue;
        };
        replication.replicas.push(Attached {
            ip: ip.to_owned(),
            port,
            online: field("state") == Some("online"),
            lag: field("lag")
                .and_then(|l| l.parse().ok())
                .unwrap_or(u64::MAX),
        });
    }
    Ok(replication)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn node(host: Value, port: i64) -> Value {
        Value::Array(vec![host, Value::Int(port), bulk("id")])
    }

    fn range(start: i64, end: i64, nodes: Vec<Value>) -> Value {
        let mut fields = vec![Value::Int(start), Value::Int(end)];
        fields.extend(nodes);
        Value::Array(fields)
    }

    #[test]
    fn a_slot_map_resolves_endpoints_as_redis_rs_does() {
        let with_ip = Value::Array(vec![
            bulk("replica-1.example"),
            Value::Int(7001),
            bulk("id2"),
            Value::Array(vec![bulk("ip"), bulk("10.0.0.9")]),
        ]);
        let reply = Value::Array(vec![
            range(
                0,
                5460,
                vec![node(bulk("10.0.0.1"), 7000), with_ip, node(bulk("?"), 1)],
            ),
            range(5461, 10922, vec![node(Value::Nil, 7002)]),
            range(10923, 16000, vec![node(bulk(""), 7004)]),
            range(16001, 16100, vec![node(bulk("0.0.0.0"), 7006)]),
            range(16101, 16383, vec![node(bulk("?"), 7008)]),
        ]);
        let map = parse_cluster_slots(&reply, "node-a.example").unwrap();
        let at = |host: &str, port| Addr::new(host, port);
        assert_eq!(
            map.primaries().cloned().collect::<Vec<_>>(),
            vec![
                at("10.0.0.1", 7000),
                at("node-a.example", 7002),
                at("node-a.example", 7004),
                at("node-a.example", 7006),
            ]
        );
        assert_eq!(
            map.shards[0].replicas,
            vec![Replica {
                addr: at("replica-1.example", 7001),
                ip: Some("10.0.0.9".into())
            }],
            "an unknown replica (`?`) taken literally"
        );
        assert_eq!(map.shard_of(0), Some(0));
        assert_eq!(map.shard_of(5460), Some(0));
        assert_eq!(map.shard_of(5461), Some(1));
        assert_eq!(map.shard_of(16100), Some(3));
        assert_eq!(map.shard_of(16101), None, "a range of an unknown primary");
        assert!(parse_cluster_slots(&bulk("ERR"), "h").is_err());
    }

    #[test]
    fn ranges_of_one_primary_are_one_shard() {
        let reply = Value::Array(vec![
            range(0, 99, vec![node(bulk("a"), 1)]),
            range(200, 16383, vec![node(bulk("a"), 1)]),
            range(100, 199, vec![node(bulk("b"), 2)]),
        ]);
        let map = parse_cluster_slots(&reply, "x").unwrap();
        assert_eq!(map.shards.len(), 2);
        assert_eq!(map.shard_of(150), Some(1));
        assert_eq!(map.shard_of(300), Some(0));
    }

    #[test]
    fn replication_lists_replicas_and_which_are_online() {
        let info = bulk(
            "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
             slave0:ip=10.0.0.2,port=6379,state=online,offset=100,lag=0\r\n\
             slave1:ip=10.0.0.3,port=6379,state=wait_bgsave,offset=0,lag=0\r\n\
             slave2:ip=10.0.0.4,port=6380,state=online,offset=90,lag=3\r\n\
             master_failover_state:no-failover\r\nslave_read_only:1\r\n",
        );
        let r = parse_replication(&info).unwrap();
        assert!(r.primary);
        assert_eq!(r.online(), 2);
        assert_eq!(
            r.replicas[2],
            Attached {
                ip: "10.0.0.4".into(),
                port: 6380,
                online: true,
                lag: 3
            }
        );
        let none = parse_replication(&bulk("# Replication\r\nrole:slave\r\n")).unwrap();
        assert!(!none.primary && none.replicas.is_empty());
    }
}
