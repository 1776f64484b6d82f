//! The local ElastiCache Serverless stand-in (`local_stack::services::ServerlessCache`) behaves as
//! AWS documents a serverless cache: TLS only, one virtual shard, the unavailable commands and
//! request shapes refused before any backend sees them, a reader endpoint that serves reads
//! after `READONLY`, IAM tokens of the serverless form only, a trimmed `INFO`, volatile-lru at
//! the storage maximum. And the product's own cache client works on it.

use std::time::{Duration, SystemTime};

use local_stack::services::{Auth, Endpoint, ServerlessCache, ServerlessOptions};
use product_cache::cache::slots::slot_of;
use product_cache::cache::{Cache, CacheOp, Fill, OpKind, Order, Probe, RedisCache};
use product_cache::config::{CacheSettings, CacheType, IamSettings, RedisSettings};
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::ids_in_one_slot;

async fn start(options: ServerlessOptions) -> ServerlessCache {
    ServerlessCache::start(options)
        .await
        .expect("start the serverless stand-in")
}

/// A TLS connection to `port` of the stand-in, trusting its CA, without credentials.
async fn connect(cache: &ServerlessCache, port: u16) -> MultiplexedConnection {
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(cache.ca_pem()),
    };
    let client = redis::Client::build_with_tls(format!("rediss://localhost:{port}"), certs)
        .expect("a TLS client");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("connect over TLS")
}

/// A plain connection straight to a backend server, for its own statistics.
async fn direct(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `cmdstat_<name>`'s calls on the server at `port` (0 when it never ran).
async fn calls(port: u16, name: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut direct(port).await)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{}:calls=", name.to_ascii_lowercase());
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map(|n| n.parse().unwrap())
        .unwrap_or(0)
}

/// The whole error reply: its code and its text.
fn text(e: &RedisError) -> String {
    format!("{} {}", e.code().unwrap_or(""), e.detail().unwrap_or(""))
}

async fn query(conn: &mut MultiplexedConnection, args: &[&str]) -> redis::RedisResult<Value> {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(conn).await
}

/// A client that does not speak TLS gets no answer at all: the endpoint closes the connection
/// on its bytes. Over TLS, with the stand-in's CA, the same PING is answered.
#[tokio::test]
async fn a_serverless_cache_speaks_tls_only() {
    let cache = start(ServerlessOptions::default()).await;
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", cache.primary_port()))
        .await
        .unwrap();
    plain.write_all(b"PING\r\n").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the endpoint kept a plain connection open");
    assert!(
        !String::from_utf8_lossy(&got).contains("PONG"),
        "plain TCP was answered: {got:?}"
    );
    let mut tls = connect(&cache, cache.primary_port()).await;
    let pong: String = redis::cmd("PING").query_async(&mut tls).await.unwrap();
    assert_eq!(pong, "PONG");
    // Only the TLS connection counts: the plain one never completed a handshake.
    assert_eq!(cache.connections(), 1);
    assert_eq!(cache.counters(Endpoint::Primary).forwarded_of("PING"), 1);
}

/// An RBAC user with a password: `AUTH user password` and `HELLO 2 AUTH user password`
/// authenticate; a wrong password, another user, or the default user's one-argument AUTH are
/// refused; RESP3 (`HELLO 3`) is refused, so clients stay on RESP2.
#[tokio::test]
async fn a_password_user_authenticates_and_nothing_else_does() {
    let cache = start(ServerlessOptions {
        auth: Auth::Password {
            user: "app".into(),
            password: "secret-pass".into(),
        },
        ..ServerlessOptions::default()
    })
    .await;
    assert_eq!(
        cache.authed_url(),
        format!(
            "rediss://app:secret-pass@localhost:{}",
            cache.primary_port()
        )
    );
    let mut conn = connect(&cache, cache.primary_port()).await;
    for args in [
        &["AUTH", "app", "wrong"][..],
        &["AUTH", "other", "secret-pass"],
        &["AUTH", "secret-pass"],
    ] {
        let err = query(&mut conn, args).await.unwrap_err();
        assert!(
            text(&err).starts_with("WRONGPASS"),
            "{args:?}: {}",
            text(&err)
        );
    }
    let err = query(&mut conn, &["HELLO", "3", "AUTH", "app", "secret-pass"])
        .await
        .unwrap_err();
    assert!(text(&err).starts_with("NOPROTO"), "{}", text(&err));
    let err = query(&mut conn, &["SET", "k", "v"]).await.unwrap_err();
    assert_eq!(text(&err), "NOAUTH Authentication required.");
    let hello = query(&mut conn, &["HELLO", "2", "AUTH", "app", "secret-pass"])
        .await
        .unwrap();
    assert!(format!("{hello:?}").contains("proto"), "{hello:?}");
    assert_eq!(
        query(&mut conn, &["SET", "k", "v"]).await.unwrap(),
        Value::Okay
    );
    let mut other = connect(&cache, cache.primary_port()).await;
    assert_eq!(
        query(&mut other, &["AUTH", "app", "secret-pass"])
            .await
            .unwrap(),
        Value::Okay
    );
    assert_eq!(
        query(&mut other, &["GET", "k"]).await.unwrap(),
        Value::BulkString(b"v".to_vec())
    );
}

/// One virtual shard: CLUSTER SLOTS has one range, 0-16383, with the primary endpoint and one
/// replica (the reader endpoint), both by hostname; SHARDS, NODES, INFO, KEYSLOT and MYID
/// agree. Both endpoints answer the same map.
#[tokio::test]
async fn the_cluster_commands_describe_one_shard_over_both_endpoints() {
    let cache = start(ServerlessOptions::default()).await;
    for port in [cache.primary_port(), cache.reader_port()] {
        let mut conn = connect(&cache, port).await;
        let slots = query(&mut conn, &["CLUSTER", "SLOTS"]).await.unwrap();
        let Value::Array(ranges) = slots else {
            panic!("{slots:?}")
        };
        assert_eq!(ranges.len(), 1, "{ranges:?}");
        let Value::Array(range) = &ranges[0] else {
            panic!("{ranges:?}")
        };
        assert_eq!(range[0], Value::Int(0));
        assert_eq!(range[1], Value::Int(16383));
        let node = |v: &Value| match v {
            Value::Array(n) => match (&n[0], &n[1], &n[2]) {
                (Value::BulkString(host), Value::Int(port), Value::BulkString(id)) => (
                    String::from_utf8(host.clone()).unwrap(),
                    *port as u16,
                    String::from_utf8(id.clone()).unwrap(),
                ),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        assert_eq!(range.len(), 4, "a primary and one replica: {range:?}");
        assert_eq!(
            node(&range[2]),
            (
                "localhost".to_owned(),
                cache.primary_port(),
                cache.node_id(Endpoint::Primary).to_owned()
            )
        );
        assert_eq!(
            node(&range[3]),
            (
                "localhost".to_owned(),
                cache.reader_port(),
                cache.node_id(Endpoint::Reader).to_owned()
            )
        );

        let shards = format!(
            "{:?}",
            query(&mut conn, &["CLUSTER", "SHARDS"]).await.unwrap()
        );
        assert!(shards.contains(cache.node_id(Endpoint::Reader)), "{shards}");
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(nodes.lines().count(), 2, "{nodes}");
        assert!(
            nodes.contains(&format!(":{}@", cache.primary_port()))
                && nodes.contains("master - 0 0 1 connected 0-16383"),
            "{nodes}"
        );
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg("product:p1")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(slot, slot_of("product:p1"));
        let id: String = redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut conn)
            .await
            .unwrap();
        let endpoint = if port == cache.primary_port() {
            Endpoint::Primary
        } else {
            Endpoint::Reader
        };
        assert_eq!(id, cache.node_id(endpoint));
    }
}

/// Every class of command a serverless cache does not offer (administration, persistence,
/// replication, KEYS, WAIT, functions, ACL, the dangerous SCRIPT subcommands) is refused with
/// Redis's own wording and never reaches the primary: its command statistics stay at zero.
#[tokio::test]
async fn unavailable_commands_are_refused_before_any_backend() {
    let cache = start(ServerlessOptions::default()).await;
    let mut conn = connect(&cache, cache.primary_port()).await;
    let refused: &[&[&str]] = &[
        &["CONFIG", "GET", "maxmemory"],
        &["KEYS", "*"],
        &["WAIT", "1", "0"],
        &["WAITAOF", "0", "1", "0"],
        &["MEMORY", "USAGE", "k"],
        &["FUNCTION", "LIST"],
        &["FCALL", "f", "1", "k"],
        &["FCALL_RO", "f", "1", "k"],
        &["ACL", "WHOAMI"],
        &["BGSAVE"],
        &["SAVE"],
        &["BGREWRITEAOF"],
        &["DEBUG", "SLEEP", "0"],
        &["REPLICAOF", "NO", "ONE"],
        &["SLAVEOF", "NO", "ONE"],
        &["SWAPDB", "0", "1"],
        &["MOVE", "k", "1"],
        &["MIGRATE", "127.0.0.1", "1", "k", "0", "1"],
        &["SHUTDOWN", "NOSAVE"],
    ];
    for args in refused {
        let err = query(&mut conn, args).await.expect_err(args[0]);
        let expected = format!(
            "ERR unknown command '{}', with args beginning with:",
            args[0]
        );
        assert!(
            text(&err).starts_with(&expected),
            "{args:?}: {}",
            text(&err)
        );
    }
    for sub in ["KILL", "FLUSH"] {
        let err = query(&mut conn, &["SCRIPT", sub]).await.expect_err(sub);
        assert!(
            text(&err).contains(&format!("unknown subcommand '{sub}'")),
            "{}",
            text(&err)
        );
    }
    let backend = cache.backend().port();
    for args in refused {
        assert_eq!(calls(backend, args[0]).await, 0, "{} reached it", args[0]);
    }
    assert_eq!(calls(backend, "script|kill").await, 0);
    assert_eq!(calls(backend, "script|flush").await, 0);
    let counters = cache.counters(Endpoint::Primary);
    assert_eq!(counters.refused_of("CONFIG"), 1, "{counters:?}");
    assert_eq!(counters.refused_of("SCRIPT"), 2, "{counters:?}");
    // The server is still up (SHUTDOWN did not reach it) and the connection still serves.
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
}

/// A request of 3,999 arguments (the command's name included) is served; one of 4,000 is
/// refused and not forwarded.
#[tokio::test]
async fn a_request_carries_at_most_3999_arguments() {
    let cache = start(ServerlessOptions::default()).await;
    let mut conn = connect(&cache, cache.primary_port()).await;
    // One hash tag: the keys share a slot, so only the count can be refused.
    let keys: Vec<String> = (0..3_999).map(|i| format!("{{t}}k{i}")).collect();
    let deleted: i64 = redis::cmd("DEL")
        .arg(&keys[..3_998])
        .query_async(&mut conn)
        .await
        .expect("3,999 arguments");
    assert_eq!(deleted, 0);
    let err = redis::cmd("DEL")
        .arg(&keys)
        .query_async::<i64>(&mut conn)
        .await
        .expect_err("4,000 arguments");
    assert!(text(&err).contains("too many arguments"), "{}", text(&err));
    assert_eq!(calls(cache.backend().port(), "del").await, 1);
}

/// A script without keys is refused with AWS's message, and a script's or a multi-key
/// command's keys in two slots are refused CROSSSLOT; none of them reaches the backend, while
/// the same requests within one slot are served.
#[tokio::test]
async fn keyless_scripts_and_keys_in_two_slots_are_refused() {
    let cache = start(ServerlessOptions::default()).await;
    let mut conn = connect(&cache, cache.primary_port()).await;
    let (a, b) = ("product:a", "product:b");
    assert_ne!(slot_of(a), slot_of(b), "the test needs two slots");

    let err = query(&mut conn, &["EVAL", "return 1", "0"])
        .await
        .unwrap_err();
    assert_eq!(
        text(&err),
        "ERR Lua scripts without any input keys are not supported"
    );
    let cross = "CROSSSLOT Keys in request don't hash to the same slot";
    let err = query(&mut conn, &["EVAL", "return 1", "2", a, b])
        .await
        .unwrap_err();
    assert_eq!(text(&err), cross);
    for command in ["DEL", "MGET", "EXISTS", "UNLINK"] {
        let err = query(&mut conn, &[command, a, b]).await.unwrap_err();
        assert_eq!(text(&err), cross, "{command}");
    }
    let err = query(&mut conn, &["MSET", a, "1", b, "2"])
        .await
        .unwrap_err();
    assert_eq!(text(&err), cross);
    let backend = cache.backend().port();
    for command in ["eval", "del", "mget", "exists", "unlink", "mset"] {
        assert_eq!(calls(backend, command).await, 0, "{command} reached it");
    }

    let one = query(&mut conn, &["EVAL", "return 1", "2", "{x}a", "{x}b"])
        .await
        .unwrap();
    assert_eq!(one, Value::Int(1));
    query(&mut conn, &["DEL", "{x}a", "{x}b"]).await.unwrap();
    assert_eq!(calls(backend, "eval").await, 1);
    assert_eq!(calls(backend, "del").await, 1);
}

/// The reader endpoint redirects a keyed command to the primary (`MOVED <slot>
/// localhost:<primary port>`) until the connection sends READONLY, and always for a write
/// (scripts included). After READONLY its reads are served by the replica: the replica's GET
/// count grows, the primary's does not, and the value written on the primary arrives there
/// (eventually: asynchronous replication).
#[tokio::test]
async fn the_reader_endpoint_serves_reads_from_the_replica_after_readonly() {
    let cache = start(ServerlessOptions::default()).await;
    let mut primary = connect(&cache, cache.primary_port()).await;
    query(&mut primary, &["SET", "product:r", "v1"])
        .await
        .unwrap();
    let mut reader = connect(&cache, cache.reader_port()).await;
    let moved_to = format!("localhost:{}", cache.primary_port());
    let err = query(&mut reader, &["GET", "product:r"]).await.unwrap_err();
    assert_eq!(
        err.redirect_node(),
        Some((moved_to.as_str(), slot_of("product:r"))),
        "{}",
        text(&err)
    );
    let (primary_gets, replica_gets) = (
        calls(cache.backend().port(), "get").await,
        calls(cache.replica().port(), "get").await,
    );
    let ok = query(&mut reader, &["READONLY"]).await.unwrap();
    assert_eq!(ok, Value::Okay);
    let mut value = Value::Nil;
    for _ in 0..200 {
        value = query(&mut reader, &["GET", "product:r"]).await.unwrap();
        if value != Value::Nil {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(value, Value::BulkString(b"v1".to_vec()));
    assert!(calls(cache.replica().port(), "get").await > replica_gets);
    assert_eq!(calls(cache.backend().port(), "get").await, primary_gets);

    for write in [
        &["SET", "product:r", "v2"][..],
        &["DEL", "product:r"],
        &["EVAL", "return 1", "1", "product:r"],
    ] {
        let err = query(&mut reader, write).await.unwrap_err();
        assert_eq!(
            err.redirect_node(),
            Some((moved_to.as_str(), slot_of("product:r"))),
            "{write:?}: {}",
            text(&err)
        );
    }
    // None of them ran anywhere: the primary saw only the first SET (the replica's count is
    // that SET replicated).
    for write in ["set", "del", "eval"] {
        let expected = u64::from(write == "set");
        assert_eq!(
            calls(cache.backend().port(), write).await,
            expected,
            "{write}"
        );
        assert_eq!(
            calls(cache.replica().port(), write).await,
            expected,
            "{write}"
        );
    }
    assert!(cache.counters(Endpoint::Reader).moved_total() >= 4);
    // READONLY on the primary endpoint is accepted and changes nothing.
    assert_eq!(
        query(&mut primary, &["READONLY"]).await.unwrap(),
        Value::Okay
    );
    query(&mut primary, &["SET", "product:r", "v2"])
        .await
        .unwrap();
}

const IAM_USER: &str = "product-cache-iam";
const CACHE_NAME: &str = "product-cache-serverless";
const REGION: &str = "us-east-1";

fn iam_options() -> ServerlessOptions {
    ServerlessOptions {
        auth: Auth::Iam {
            user: IAM_USER.into(),
            cache_name: CACHE_NAME.into(),
            region: REGION.into(),
        },
        ..ServerlessOptions::default()
    }
}

fn signed(cache: &str, serverless: bool, at: SystemTime) -> String {
    let target = product_cache::iam::Target {
        region: REGION.into(),
        cache: cache.into(),
        serverless,
        user_id: IAM_USER.into(),
    };
    let credentials = aws_credential_types::Credentials::new("AKIDTEST", "secret", None, None, "t");
    product_cache::iam::token(&target, &credentials, at).unwrap()
}

/// IAM: before AUTH every command answers NOAUTH; a token signed for a node-based cache, for
/// another cache's name, or 20 minutes ago is refused WRONGPASS; the product's token for this
/// serverless cache (`ResourceType=ServerlessCache`) is accepted and the connection then works.
#[tokio::test]
async fn only_a_serverless_iam_token_for_this_cache_authenticates() {
    let cache = start(iam_options()).await;
    let mut conn = connect(&cache, cache.primary_port()).await;
    let err = query(&mut conn, &["GET", "k"]).await.unwrap_err();
    assert_eq!(text(&err), "NOAUTH Authentication required.");
    let now = SystemTime::now();
    let wrong = [
        ("node-based", signed(CACHE_NAME, false, now)),
        ("another cache", signed("other-cache", true, now)),
        (
            "expired",
            signed(CACHE_NAME, true, now - Duration::from_secs(1_200)),
        ),
    ];
    for (what, token) in &wrong {
        let err = query(&mut conn, &["AUTH", IAM_USER, token])
            .await
            .unwrap_err();
        assert_eq!(
            text(&err),
            "WRONGPASS invalid username-password pair or user is disabled.",
            "{what}"
        );
    }
    let good = signed(CACHE_NAME, true, now);
    let err = query(&mut conn, &["AUTH", "someone-else", &good])
        .await
        .unwrap_err();
    assert!(text(&err).starts_with("WRONGPASS"), "{}", text(&err));
    let err = query(&mut conn, &["GET", "k"]).await.unwrap_err();
    assert_eq!(text(&err), "NOAUTH Authentication required.");
    assert_eq!(calls(cache.backend().port(), "get").await, 0);

    assert_eq!(
        query(&mut conn, &["AUTH", IAM_USER, &good]).await.unwrap(),
        Value::Okay
    );
    assert_eq!(query(&mut conn, &["GET", "k"]).await.unwrap(), Value::Nil);
}

/// INFO keeps the documented sections only (no `# Replication`, `# Persistence`, `# CPU`), and
/// the switch removes `evicted_keys` from `# Stats` while the rest of it stays.
#[tokio::test]
async fn info_is_trimmed_and_evicted_keys_can_be_switched_off() {
    let cache = start(ServerlessOptions::default()).await;
    let mut conn = connect(&cache, cache.primary_port()).await;
    let info = |conn: &mut MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("INFO")
                .query_async::<String>(&mut conn)
                .await
                .unwrap()
        }
    };
    let full = info(&mut conn).await;
    for kept in [
        "# Server",
        "redis_version:",
        "# Clients",
        "used_memory:",
        "# Stats",
        "evicted_keys:",
        "# Keyspace",
    ] {
        assert!(full.contains(kept), "{kept} missing: {full}");
    }
    for dropped in [
        "# Replication",
        "role:",
        "# Persistence",
        "# CPU",
        "maxmemory_policy",
    ] {
        assert!(!full.contains(dropped), "{dropped} kept: {full}");
    }
    cache.set_evicted_keys_in_info(false);
    let trimmed = info(&mut conn).await;
    assert!(!trimmed.contains("evicted_keys"), "{trimmed}");
    assert!(trimmed.contains("expired_keys:"), "{trimmed}");
}

/// A pipeline mixing forwarded and refused commands gets one reply per command, in order: the
/// refused ones as errors in their places, the forwarded ones as the backend answered them.
#[tokio::test]
async fn a_pipeline_keeps_its_order_around_refused_commands() {
    let cache = start(ServerlessOptions::default()).await;
    let mut conn = connect(&cache, cache.primary_port()).await;
    let replies: Vec<redis::RedisResult<Value>> = redis::pipe()
        .ignore_errors()
        .cmd("SET")
        .arg("{p}a")
        .arg("1")
        .cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .cmd("INCR")
        .arg("{p}a")
        .cmd("KEYS")
        .arg("*")
        .cmd("EVAL")
        .arg("return 7")
        .arg(0)
        .cmd("GET")
        .arg("{p}a")
        .cmd("DEL")
        .arg("{p}a")
        .arg("{q}b")
        .cmd("INCR")
        .arg("{p}a")
        .query_async(&mut conn)
        .await
        .unwrap();
    let shown: Vec<String> = replies
        .iter()
        .map(|r| match r {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error {}", e.code().unwrap_or("")),
        })
        .collect();
    assert_eq!(replies.len(), 8, "{shown:?}");
    assert_eq!(replies[0].as_ref().ok(), Some(&Value::Okay), "{shown:?}");
    assert!(replies[1].is_err(), "{shown:?}");
    assert_eq!(replies[2].as_ref().ok(), Some(&Value::Int(2)), "{shown:?}");
    assert!(replies[3].is_err(), "{shown:?}");
    assert!(replies[4].is_err(), "{shown:?}");
    assert_eq!(
        replies[5].as_ref().ok(),
        Some(&Value::BulkString(b"2".to_vec())),
        "{shown:?}"
    );
    assert_eq!(
        replies[6].as_ref().err().and_then(|e| e.code()),
        Some("CROSSSLOT"),
        "{shown:?}"
    );
    assert_eq!(replies[7].as_ref().ok(), Some(&Value::Int(3)), "{shown:?}");
}

/// At the storage maximum, volatile-lru evicts keys with a TTL and never one without: writing
/// far more TTL'd data than fits leaves every key without a TTL in place, evicts TTL'd ones
/// (`evicted_keys` > 0, fewer keys left than written), and every write succeeds.
#[tokio::test]
async fn at_its_maximum_the_cache_evicts_keys_with_a_ttl_only() {
    let cache = start(ServerlessOptions {
        max_memory: Some(8 * 1024 * 1024),
        ..ServerlessOptions::default()
    })
    .await;
    let mut conn = connect(&cache, cache.primary_port()).await;
    let value = "x".repeat(4 * 1024);
    for i in 0..10 {
        query(&mut conn, &["SET", &format!("keep:{i}"), &value])
            .await
            .unwrap();
    }
    // 4,000 x 4 KiB = 16 MiB of keys with a TTL, twice the maximum.
    let written = 4_000;
    for chunk in 0..written / 100 {
        let mut pipe = redis::pipe();
        for i in chunk * 100..(chunk + 1) * 100 {
            pipe.cmd("SET")
                .arg(format!("ttl:{i}"))
                .arg(&value)
                .arg("EX")
                .arg(3_600)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .expect("volatile-lru makes room");
    }
    for i in 0..10 {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(format!("keep:{i}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 1, "keep:{i} (no TTL) was evicted");
    }
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert!(size < 10 + written, "nothing evicted: {size} keys");
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let evicted: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(evicted > 0, "{info}");
}

/// The product's own client on the stand-in, as a deployment on ElastiCache Serverless runs
/// it: `rediss://`, cluster, `CacheType::Serverless`, the stand-in's CA, IAM tokens for this
/// serverless cache. A probe takes the lease, the fill lands and hits; a batch of 1,000 refreshes
/// in ONE hash slot (split by the library into script calls under 3,999 arguments) applies in
/// full and every value lands; and the stand-in refused none of the product's commands.
#[tokio::test]
async fn the_product_cache_works_on_the_serverless_stand_in() {
    let cache = start(iam_options()).await;
    let sdk = local_stack::table::local_sdk_config(crate::support::moto_endpoint()).await;
    assert_eq!(sdk.region().map(|r| r.as_ref()), Some(REGION));
    let redis = RedisSettings {
        cluster: true,
        cache_type: CacheType::Serverless,
        ca_file: Some(cache.ca_file().to_path_buf()),
        iam: Some(IamSettings {
            user_id: IAM_USER.into(),
            cache: CACHE_NAME.into(),
            serverless: true,
        }),
        ..RedisSettings::new(cache.url())
    };
    let product = RedisCache::from_settings(&redis, &CacheSettings::default(), &sdk)
        .await
        .expect("the product's cache on the stand-in");
    // The connection forms in the background: the first calls may find it still connecting.
    let mut probe = None;
    for _ in 0..100 {
        match product
            .probe("product:smoke", "t1", Duration::from_secs(5))
            .await
        {
            Ok(p) => {
                probe = Some(p);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(probe, Some(Probe::Lease));
    let filled = product
        .fill(Fill {
            key: "product:smoke".into(),
            token: "t1".into(),
            value: "{\"price\":1}".into(),
            ttl: Duration::from_secs(60),
            order: None,
        })
        .await
        .unwrap();
    assert!(filled);
    let hit = product
        .probe("product:smoke", "t2", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(hit, Probe::Hit("{\"price\":1}".into()));

    let mut declared = false;
    for _ in 0..100 {
        if product.declare_empty().await.is_ok() {
            declared = true;
            break;
        }
    }
    assert!(declared, "the epochs were never declared");
    let ids = ids_in_one_slot(1_000);
    let keys: Vec<String> = ids.iter().map(|id| format!("product:{id}")).collect();
    // Made now: after the slot's epoch, so the refreshes write (an older record would delete).
    let created_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ops: Vec<CacheOp> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| CacheOp {
            kind: OpKind::Set {
                value: format!("{{\"n\":{i}}}"),
                ttl: Duration::from_secs(600),
            },
            order: Order::sequence(&format!("{}", 1_000 + i)),
            created_ms: Some(created_ms),
            ..CacheOp::delete(key.clone())
        })
        .collect();
    let applied = product.apply(&ops).await.expect("the one-slot batch");
    assert!(applied.refused.is_empty(), "{applied:?}");
    let values = product.get_many(&keys).await;
    for (i, value) in values.into_iter().enumerate() {
        assert_eq!(
            value.unwrap(),
            Some(format!("{{\"n\":{i}}}")),
            "{}",
            keys[i]
        );
    }
    let counters = cache.counters(Endpoint::Primary);
    assert_eq!(counters.refused_total(), 0, "{counters:?}");
    assert!(counters.forwarded_total() > 0, "{counters:?}");

    // Replica reads: the product sends READONLY on its replica connections, so the reader
    // endpoint serves its reads (no MOVED), and they find the values once replicated.
    let replicas = RedisSettings {
        read_from_replicas: true,
        ..redis
    };
    let reading = RedisCache::from_settings(&replicas, &CacheSettings::default(), &sdk)
        .await
        .unwrap();
    let mut found = 0;
    for _ in 0..200 {
        let values = reading.get_many(&keys[..10]).await;
        found = values.iter().filter(|v| matches!(v, Ok(Some(_)))).count();
        if found == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(found, 10);
    let reader = cache.counters(Endpoint::Reader);
    assert!(reader.forwarded_total() > 0, "{reader:?}");
    assert_eq!(reader.moved_total(), 0, "{reader:?}");
    assert_eq!(reader.refused_total(), 0, "{reader:?}");
}
