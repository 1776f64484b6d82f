//! ElastiCache IAM authentication against a real redis-server. The "IAM user" is an ordinary ACL
//! user (with the functions' rules) whose password is the token the function signs: a new token
//! is simulated by advancing the signing clock and `ACL SETUSER ... resetpass >token` to the
//! token for that time, so the old one stops working, as an expired token does. `CLIENT KILL`
//! stands for ElastiCache closing the connection (its 12-hour limit, a failover). The default
//! user is off, as in the template's user group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials as _;
use aws_smithy_async::time::{SharedTimeSource, TimeSource};
use local_stack::services::{RedisCluster, RedisServer};
use product_cache::config::{
    CacheSettings, IamSettings, InvalidationMode, InvalidatorSettings, ReadSettings, RedisSettings,
};
use product_cache::iam::IamCredentials;
use product_cache::invalidate::Invalidator;
use product_cache::read::{CacheStatus, ReadPath};

use crate::support::{fixture, fresh, TestEnv};

const USER: &str = "product-cache-iam";
const GROUP: &str = "product-cache";
const ADMIN: &str = "admin:adminpass";

/// The signing clock: wall time the test sets.
#[derive(Debug, Clone)]
struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl TimeSource for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

fn iam_settings() -> IamSettings {
    IamSettings {
        user_id: USER.into(),
        cache: GROUP.into(),
        serverless: false,
    }
}

/// The test environment's SDK configuration (moto's static credentials, its Region) with the
/// signing clock replaced by `clock`.
fn sdk_with(env: &TestEnv, clock: &ManualClock) -> aws_config::SdkConfig {
    env.sdk
        .to_builder()
        .time_source(SharedTimeSource::new(clock.clone()))
        .build()
}

/// The token the functions will sign at the clock's current time.
async fn current_token(sdk: &aws_config::SdkConfig) -> String {
    IamCredentials::from_sdk(&iam_settings(), sdk)
        .unwrap()
        .auth()
        .await
        .unwrap()
        .password()
        .to_owned()
}

async fn admin(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{ADMIN}@127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> T {
    let mut conn = admin(port).await;
    redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"))
}

/// An admin user, the IAM user with the functions' rules and `token` as its only password, and
/// the default user switched off.
async fn prepare(port: u16, token: &str) {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "admin", "on", ">adminpass", "~*", "&*", "+@all"][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    set_password(port, token).await;
    let rules = product_cache::acl::rules("product:");
    let mut setuser = vec!["SETUSER", USER, "on"];
    setuser.extend(rules.split_whitespace());
    let _: () = query(port, &[&["ACL"][..], &setuser].concat()).await;
    let _: () = query(port, &["ACL", "SETUSER", "default", "off"]).await;
}

/// The IAM user accepts `token` and nothing else from now on.
async fn set_password(port: u16, token: &str) {
    let password = format!(">{token}");
    let _: () = query(port, &["ACL", "SETUSER", USER, "resetpass", &password]).await;
}

/// Closes every connection of the IAM user; returns how many there were.
async fn kill_iam_connections(port: u16) -> i64 {
    query(port, &["CLIENT", "KILL", "USER", USER]).await
}

/// Failed AUTH attempts the server logged: the counts of its `ACL LOG` entries of reason
/// `auth` (repeated failures share an entry).
async fn failed_auths(port: u16) -> i64 {
    let log: Vec<HashMap<String, redis::Value>> = query(port, &["ACL", "LOG"]).await;
    log.into_iter()
        .filter(|entry| {
            entry
                .get("reason")
                .cloned()
                .map(redis::from_redis_value::<String>)
                == Some(Ok("auth".into()))
        })
        .map(|entry| redis::from_redis_value::<i64>(entry["count"].clone()).unwrap())
        .sum()
}

/// A plain client authenticating as the IAM user with `token`: refused or not.
async fn accepts(port: u16, token: &str) -> bool {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("AUTH")
        .arg(USER)
        .arg(token)
        .query_async::<()>(&mut conn)
        .await
        .is_ok()
}

/// Moves `clock` on 11 minutes, past `old`'s validity as far as the servers at `ports` are
/// concerned, and returns the token signed at the new time. Every node learns the new token
/// before the clock moves and forgets the old one only after: a connection the client opens
/// in the background meanwhile (on a cluster, to a node no request needed yet) presents a token
/// some node accepts, as with ElastiCache, which accepts any token still valid. Forgetting the
/// old token on one node while a connection signed just before the move reached another was
/// a failed `AUTH` this test counted under load.
async fn rotate(env: &TestEnv, clock: &ManualClock, old: &str, ports: &[u16]) -> String {
    let later = *clock.0.lock().unwrap() + Duration::from_secs(660);
    let next = current_token(&sdk_with(env, &ManualClock(Arc::new(Mutex::new(later))))).await;
    assert_ne!(next, old);
    for &port in ports {
        let password = format!(">{next}");
        let _: () = query(port, &["ACL", "SETUSER", USER, &password]).await;
    }
    clock.advance(Duration::from_secs(660));
    for &port in ports {
        let forget = format!("<{old}");
        let _: () = query(port, &["ACL", "SETUSER", USER, &forget]).await;
    }
    next
}

/// Both functions, IAM-authenticated against `ports` (one node, or every node of a cluster):
/// each serves after its connections were killed and the token changed, without a bypass or a
/// failed record, and no AUTH ever failed.
async fn reconnect_with_fresh_tokens(url: String, cluster: bool, ports: &[u16]) {
    let mut env = TestEnv::new(InvalidationMode::Delete).await;
    let clock = ManualClock(Arc::new(Mutex::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_979_289),
    )));
    let sdk = sdk_with(&env, &clock);
    let first = current_token(&sdk).await;
    for &port in ports {
        prepare(port, &first).await;
    }
    let redis = RedisSettings {
        cluster,
        iam: Some(iam_settings()),
        ..RedisSettings::new(url)
    };
    let settings = CacheSettings::default();
    let read = ReadSettings::new(redis.clone(), &env.table, settings.clone());
    let read = ReadPath::build(read, &sdk).await.unwrap();
    let invalidator = InvalidatorSettings {
        redis,
        mode: InvalidationMode::Delete,
        cache: settings,
    };
    let invalidator = Invalidator::build(invalidator, &sdk).await.unwrap();
    env.put_product("kb-001", "129.99").await;
    env.new_stream_event().await;
    let event = fresh(fixture("modify.json"));
    // Until both have connected (in the background): a fill and a hit, an applied batch.
    crate::support::connected(&read, &invalidator, &event).await;
    let list: String = query(ports[0], &["CLIENT", "LIST"]).await;
    let as_iam = list
        .lines()
        .filter(|l| l.contains(&format!(" user={USER} ")));
    assert!(as_iam.count() >= 2, "both run as the IAM user: {list}");

    // Eleven minutes later the first token has expired: only a new one is accepted.
    let second = rotate(&env, &clock, &first, ports).await;
    let mut killed = 0;
    for &port in ports {
        killed += kill_iam_connections(port).await;
    }
    assert!(killed >= 2, "killed {killed}");
    assert!(
        !accepts(ports[0], &first).await,
        "the old token still works"
    );
    assert!(accepts(ports[0], &second).await);
    assert_eq!(
        read.get("kb-001").await.0,
        CacheStatus::Hit,
        "the read after the reconnect bypassed"
    );

    let _third = rotate(&env, &clock, &second, ports).await;
    for &port in ports {
        kill_iam_connections(port).await;
    }
    // A new change of kb-001, so that the batch has something to apply.
    env.put_product("kb-001", "99.99").await;
    let event = env.new_stream_event().await;
    let response = invalidator.handle(event).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "the batch after the reconnect failed: {response:?}"
    );
    assert_eq!(read.get("kb-001").await.0, CacheStatus::Miss, "not applied");
    // The two refused tokens above are this test's own probes; the functions never failed one.
    let failed: i64 = futures::future::join_all(ports.iter().map(|&p| failed_auths(p)))
        .await
        .into_iter()
        .sum();
    assert_eq!(
        failed, 1,
        "only the probe with the old token may have failed"
    );
}

#[tokio::test]
async fn iam_tokens_are_fresh_on_every_reconnect_on_a_single_node() {
    let server = RedisServer::start().await.unwrap();
    let port = server.port();
    reconnect_with_fresh_tokens(server.url(), false, &[port]).await;
}

#[tokio::test]
async fn iam_tokens_are_fresh_on_every_reconnect_on_a_cluster() {
    let cluster = RedisCluster::start(3).await.unwrap();
    reconnect_with_fresh_tokens(cluster.url(), true, &cluster.ports()).await;
}

/// What keeps a connection past ElastiCache's 12 hours: the live connection re-authenticates
/// with each refreshed token, on the same connection (no reconnect), while serving. Here with
/// a refresh every 300 ms of real time; each round the clock moves on 10 minutes, the server
/// learns the new token, then forgets the old one, and the connection must re-AUTH (without
/// a failure) and keep its id.
#[tokio::test]
async fn a_live_connection_re_authenticates_with_each_refreshed_token() {
    let env = TestEnv::new(InvalidationMode::Delete).await;
    let server = RedisServer::start().await.unwrap();
    let port = server.port();
    let clock = ManualClock(Arc::new(Mutex::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_979_289),
    )));
    let sdk = sdk_with(&env, &clock);
    prepare(port, &current_token(&sdk).await).await;
    let target = IamCredentials::from_sdk(&iam_settings(), &sdk)
        .unwrap()
        .target()
        .clone();
    let credentials = sdk
        .credentials_provider()
        .unwrap()
        .provide_credentials()
        .await
        .unwrap();
    let refresh = Duration::from_millis(300);
    let provider = IamCredentials::with_intervals(
        target.clone(),
        sdk.credentials_provider().unwrap(),
        sdk.time_source().unwrap(),
        refresh,
        refresh,
    );
    let config = redis::aio::ConnectionManagerConfig::new().set_credentials_provider(provider);
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .unwrap();
    // One admin connection throughout, so that the AUTH count is the IAM connection's.
    let mut admin = admin(port).await;
    async fn q(admin: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> String {
        redis::cmd(args[0])
            .arg(&args[1..])
            .query_async(admin)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }
    let auths = |info: String| -> u64 {
        let line = info.lines().find(|l| l.starts_with("cmdstat_auth:"));
        let calls = line.and_then(|l| l.split("calls=").nth(1));
        calls
            .and_then(|c| c.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    // The id of the IAM user's one connection.
    let id = |list: String| -> String {
        let mine: Vec<&str> = list
            .lines()
            .filter(|l| l.contains(&format!(" user={USER} ")))
            .collect();
        assert_eq!(mine.len(), 1, "{list}");
        mine[0].split(' ').next().unwrap_or_default().to_owned()
    };
    let before = id(q(&mut admin, &["CLIENT", "LIST"]).await);
    assert!(before.starts_with("id="), "{before}");
    for round in 1..=3u32 {
        let at = clock.now() + Duration::from_secs(600);
        let token = product_cache::iam::token(&target, &credentials, at).unwrap();
        // The new token is accepted alongside the old, which has not expired yet...
        let _ = q(&mut admin, &["ACL", "SETUSER", USER, &format!(">{token}")]).await;
        clock.advance(Duration::from_secs(600));
        // ...and once the connection had the time to re-AUTH with it, only the new one is.
        tokio::time::sleep(2 * refresh).await;
        let _ = q(
            &mut admin,
            &["ACL", "SETUSER", USER, "resetpass", &format!(">{token}")],
        )
        .await;
        let start = auths(q(&mut admin, &["INFO", "commandstats"]).await);
        let deadline = std::time::Instant::now() + 10 * refresh;
        while auths(q(&mut admin, &["INFO", "commandstats"]).await) < start + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no re-AUTH"
            );
            tokio::time::sleep(refresh / 4).await;
        }
        // Every AUTH succeeded (a refused one is logged), on the same connection, which serves.
        assert_eq!(failed_auths(port).await, 0, "round {round}");
        let _: Option<String> = redis::cmd("GET")
            .arg("product:1")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(id(q(&mut admin, &["CLIENT", "LIST"]).await), before);
    }
}
