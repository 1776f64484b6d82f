//! The `CLUSTER` replies the front makes itself: one virtual shard, every slot on the primary
//! endpoint, the reader endpoint its replica.

use super::connection::{Action, Connection};
use super::policy::{key_slot, unknown_subcommand};
use super::resp::{bulk, error};
use super::{Endpoint, Outcome};

/// Hash slots of a cluster.
const SLOTS: u16 = 16_384;

impl Connection<'_> {
    pub(super) fn cluster(&self, args: &[Vec<u8>]) -> Action {
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
