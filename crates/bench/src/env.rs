//! The servers every figure runs against, started by the benchmark itself the way the tests
//! start theirs: one `redis-server` with a delaying proxy in front, and (for the figures that
//! read the table) one `moto_server`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use local_stack::services::{DelayedRedis, MotoServer};
use product_cache::config::{CacheSettings, ReadSettings, RedisSettings};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};

use crate::report::Net;
use crate::stats::{self, CmdStat};
use crate::Error;

pub struct Env {
    pub redis: DelayedRedis,
    /// What the proxy adds per round trip.
    delay: Duration,
    pub moto: Option<MotoServer>,
    pub sdk: SdkConfig,
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// Straight to the server: setup, `INFO`, `CONFIG RESETSTAT`. Never through the proxy.
    control: MultiplexedConnection,
    /// `INFO` commands sent so far, to tell them from the ones scripts run.
    info_calls: AtomicU64,
    /// moto runs with Python's cyclic garbage collector off.
    pub moto_gc_off: bool,
    /// Holds the moto wrapper script; deleted on drop.
    _scratch: tempfile::TempDir,
}

/// moto_server with Python's cyclic garbage collector off, and whether that worked. With the
/// flash sale's 100,000-item table, collections walk millions of objects and stall requests for
/// seconds (GetItems of 2.4 s, and changes reaching the cache 2 s late, were seen with it on;
/// under 1 s with it off), which DynamoDB does not do and which would be charged to the cache's
/// staleness. Reference counting still frees what requests allocate (moto stays near 1 GiB).
fn moto_without_gc_pauses(dir: &Path) -> Result<(PathBuf, bool), Error> {
    let moto = local_stack::services::find_moto_server()?;
    let text = std::fs::read_to_string(&moto).unwrap_or_default();
    // A pip-installed console script: its shebang names the venv's python.
    let Some(python) = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("#!"))
        .map(str::trim)
        .filter(|p| !p.contains(' ') && text.contains("from moto.server import main"))
    else {
        return Ok((moto, false));
    };
    let script = dir.join("moto_server_without_gc");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec '{python}' -c 'import gc, sys; gc.disable(); from moto.server import main; sys.exit(main())' \"$@\"\n"
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok((script, true))
}

impl Env {
    pub async fn start(delay: Duration, with_moto: bool) -> Result<Env, Error> {
        let redis = DelayedRedis::start(delay).await?;
        let scratch = tempfile::Builder::new().prefix("bench-").tempdir()?;
        let (moto, moto_gc_off) = if with_moto {
            let (binary, gc_off) = moto_without_gc_pauses(scratch.path())?;
            (Some(MotoServer::start_binary(&binary).await?), gc_off)
        } else {
            (None, false)
        };
        // Nothing listens on port 9 (discard); a figure that needs DynamoDB starts moto.
        let endpoint = moto
            .as_ref()
            .map_or_else(|| "http://127.0.0.1:9".to_owned(), MotoServer::endpoint);
        let sdk = local_stack::table::local_sdk_config(&endpoint).await;
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let control = redis::Client::open(redis.direct_url())?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Env {
            redis,
            delay,
            moto,
            sdk,
            dynamodb,
            control,
            info_calls: AtomicU64::new(0),
            moto_gc_off,
            _scratch: scratch,
        })
    }

    /// What the proxy adds per round trip, for figures that start servers of their own.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The URL the code under test uses.
    pub fn url(&self, net: Net) -> String {
        match net {
            Net::Loopback => self.redis.direct_url(),
            Net::Proxy => self.redis.url(),
        }
    }

    pub fn moto_endpoint(&self) -> Result<String, Error> {
        self.moto
            .as_ref()
            .map(MotoServer::endpoint)
            .ok_or_else(|| "this figure needs moto, which was not started".into())
    }

    /// Round trips through the proxy so far.
    pub fn round_trips(&self) -> u64 {
        self.redis.proxy().round_trips()
    }

    pub fn control(&self) -> MultiplexedConnection {
        self.control.clone()
    }

    pub async fn flushall(&self) -> Result<(), Error> {
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut self.control())
            .await?;
        Ok(())
    }

    /// Zeroes `INFO commandstats` (fine on a local server; the product never needs CONFIG).
    pub async fn resetstat(&self) -> Result<(), Error> {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut self.control())
            .await?;
        Ok(())
    }

    /// How many `INFO` commands [`info`](Self::info) has sent.
    pub fn info_calls(&self) -> u64 {
        self.info_calls.load(Ordering::SeqCst)
    }

    pub async fn info(&self, section: &str) -> Result<String, Error> {
        self.info_calls.fetch_add(1, Ordering::SeqCst);
        Ok(redis::cmd("INFO")
            .arg(section)
            .query_async(&mut self.control())
            .await?)
    }

    pub async fn commandstats(&self) -> Result<std::collections::BTreeMap<String, CmdStat>, Error> {
        Ok(stats::parse_commandstats(&self.info("commandstats").await?))
    }

    /// The server process's CPU time so far, in seconds.
    pub async fn cpu_seconds(&self) -> Result<f64, Error> {
        Ok(stats::parse_cpu(&self.info("cpu").await?))
    }

    /// Waits until the server has been up for `secs`: a refresh from a record created before
    /// the server started (less the clock margin) is applied as a delete, by design.
    pub async fn wait_uptime(&self, secs: u64) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(secs + 5);
        loop {
            let info = self.info("server").await?;
            let uptime: u64 = info
                .lines()
                .find_map(|l| l.strip_prefix("uptime_in_seconds:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if uptime >= secs || Instant::now() > deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A plain connection of the kind the product uses for a single node (a connection
    /// manager), for the baselines.
    pub async fn raw_conn(&self, net: Net) -> Result<ConnectionManager, Error> {
        connection_manager(&self.url(net)).await
    }

    /// The read function's settings for `table`, with Redis where `net` says.
    pub fn read_settings(&self, net: Net, table: &str, cache: CacheSettings) -> ReadSettings {
        ReadSettings::new(RedisSettings::new(self.url(net)), table, cache)
    }

    /// Median PING time straight to the server and through the proxy, in ms.
    pub async fn ping_times(&self) -> Result<(f64, f64), Error> {
        let mut out = [0.0; 2];
        for (i, net) in [Net::Loopback, Net::Proxy].into_iter().enumerate() {
            let mut conn = self.raw_conn(net).await?;
            let mut times = Vec::with_capacity(200);
            for _ in 0..200 {
                let started = Instant::now();
                redis::cmd("PING").query_async::<String>(&mut conn).await?;
                times.push(stats::millis(started.elapsed()));
            }
            out[i] = stats::median(&times);
        }
        Ok((out[0], out[1]))
    }
}

/// A connection manager to `url`, as [`Env::raw_conn`] makes them: for baselines against a
/// server of a figure's own (a cluster node through its proxy).
pub async fn connection_manager(url: &str) -> Result<ConnectionManager, Error> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}
